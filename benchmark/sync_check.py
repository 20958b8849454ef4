"""Host syncs in the step loops: every method's stages run under ``torch.cuda.set_sync_debug_mode("error")``.

    python -m benchmark.sync_check --device cuda                  # every registered method, paper profile
    python -m benchmark.sync_check dfad hidfd --device cuda --stage-iterations 5

A check script for a GPU machine, not a test (on CPU nothing synchronises, so it can only pass there;
``tests/test_syncguard.py`` checks the switching itself).  Each method runs on synthetic images of the
dataset's shape, as :mod:`benchmark.speed` does, with each stage ended after ``--stage-iterations``
iterations and a validation every 2 iterations; validation, logging and checkpoint writing are
exempt (:mod:`methods.core.syncguard`).  A synchronising call inside an iteration body raises on
CUDA: the method fails, and the report names the innermost frame of ``methods/`` in the traceback.
Exit code 0 when every method passed, 1 otherwise.
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import click


def innermost_method_frame(error: BaseException) -> str:
    """``file:line in function`` of the deepest traceback frame under ``methods/`` (else the deepest)."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "/methods/" in f.filename.replace("\\", "/")]
    frame = (ours or frames)[-1]
    root = Path(__file__).resolve().parents[1]
    try:
        name = str(Path(frame.filename).resolve().relative_to(root))
    except ValueError:
        name = frame.filename
    return f"{name}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


def check_method(method: str, profile: str, dataset: str, device: str, amp: str, stage_iterations: int,
                 results: str | None, collected: int | None) -> dict[str, Any]:
    """Run ``method`` with the guard on; ``passed`` False with the offending frame when a body synchronised."""
    from methods.core.api import Budget, distill
    from methods.core.method import CollectedUse
    from methods.core.registry import get_method

    from .data import get_spec
    from .speed import default_pair, prepare

    cls = get_method(method)
    spec = get_spec(dataset)
    pair = cls.default_pairs.get(dataset) or default_pair(spec.channels)
    if cls.collected_use == CollectedUse.NONE:
        collected = 0
    elif collected is None:
        collected = 100 if cls.collected_use == CollectedUse.REQUIRED else 0
    job = {"method": method, "profile": profile, "dataset": dataset, "teacher": pair[0], "student": pair[1],
           "iterations": stage_iterations, "device": device, "amp": amp, "threads": None, "collected": collected,
           "seed": 0, "overrides": {"eval_every": 2}, "results": results}
    run = prepare(job)
    row: dict[str, Any] = {"method": method, "pair": f"{pair[0]}->{pair[1]}", "collected": collected}
    try:
        distill(run["teacher"], run["student"], Budget(collected=collected), method=method, data=run["data"],
                profile=profile, overrides=run["overrides"], seed=0, device=run["device"], amp=amp,
                sync_debug=True, stage_limit=stage_iterations)
        row.update(passed=True, where="")
    except RuntimeError as error:  # distill's guard has already set the mode back to "default"
        row.update(passed=False, where=innermost_method_frame(error), error=str(error).splitlines()[0][:200])
    return row


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("methods", nargs=-1)
@click.option("--profile", default="paper", show_default=True)
@click.option("--dataset", default="mnist", show_default=True)
@click.option("--device", default="cuda", show_default=True)
@click.option("--amp", type=click.Choice(["auto", "bf16", "off"]), default="auto", show_default=True)
@click.option("--stage-iterations", type=click.IntRange(min=2), default=4, show_default=True,
              help="Iterations of each stage checked (validation every 2).")
@click.option("--collected", type=click.IntRange(min=1), default=None,
              help="Collected examples for methods that need them (default 100; optional ones run data-free).")
@click.option("--results", envvar="DFKD_RESULTS", default=None, help="Results folder holding cached teachers.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(methods: tuple[str, ...], profile: str, dataset: str, device: str, amp: str, stage_iterations: int,
         collected: int | None, results: str | None, as_json: bool) -> None:
    """Run every (or each named) method's stages with host-device syncs as errors; report where one happened."""
    import torch

    from methods.core.errors import DfkdError
    from methods.core.registry import get_method, method_names

    names = list(methods) or list(method_names())
    try:
        for name in names:
            get_method(name)
    except DfkdError as error:
        raise click.UsageError(str(error)) from None
    if not device.startswith("cuda") or not torch.cuda.is_available():
        click.echo(f"note: device {device!r} is not CUDA: nothing synchronises, so this run can only pass "
                   "(it still exercises every stage with the guard)", err=True)
    rows = []
    for name in names:
        rows.append(check_method(name, profile, dataset, device, amp, stage_iterations, results, collected))
        row = rows[-1]
        click.echo(f"{name:<14} {'pass' if row['passed'] else 'SYNC'}  {row['where']}", err=not as_json)
    if as_json:
        click.echo(json.dumps({"device": device, "profile": profile, "dataset": dataset, "methods": rows}))
    failed = [r["method"] for r in rows if not r["passed"]]
    if failed:
        click.echo(f"host syncs inside step loops: {', '.join(failed)}", err=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
