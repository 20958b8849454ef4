"""``dfkd-bench distill``: one method, one dataset, one budget, one seed."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from methods.core.api import Budget
from methods.core.checkpoint import CheckpointConfig
from methods.core.errors import EXIT_SLICE_ENDED, DfkdError, SliceEnded

from ..experiment import RunSpec, execute, summary, validate
from ..progress import ProgressBar
from ..settings import Settings
from ..units import parse_duration
from .app import common_options, main, parse_sets


@main.command("distill")
@click.option("--method", required=True, help="Registered method (see `dfkd-bench methods`).")
@click.option("--dataset", required=True, help="Dataset name, e.g. mnist.")
@click.option("--teacher", required=True, help="Teacher arch (cached; see `dfkd-bench teachers list`).")
@click.option("--student", required=True, help="Student arch from the zoo.")
@click.option("--collected", type=click.IntRange(min=0), default=0, show_default=True,
              help="Collected real examples the method may use (labels withheld).")
@click.option("--source", default=None, help="Collected pool, <dataset>:train (default: the teacher's train-core).")
@click.option("--unbalanced", is_flag=True, help="Draw collected examples uniformly instead of class-balanced.")
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Override the recipe's iterations.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Override the recipe's batch size.")
@click.option("--profile", default="quick", show_default=True, help="Recipe profile: quick (CPU minutes) or paper.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a hyperparameter (repeatable).")
@click.option("--amp", type=click.Choice(["auto", "bf16", "off"]), default="auto", show_default=True,
              help="auto = bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--download", is_flag=True, help="Let torchvision download the dataset.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (accuracies as fractions; "
              "'history': every evaluation's metrics).")
@click.option("--checkpoint", "checkpoint", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Write a resumable checkpoint here at each evaluation and stage boundary (removed when the run finishes).")
@click.option("--resume", is_flag=True,
              help="Continue from --checkpoint if it exists (without it an existing checkpoint is refused).")
@click.option("--stop-after", "stop_after", default=None, metavar="DURATION",
              help=f"Checkpoint and exit with code {EXIT_SLICE_ENDED} after this long (90s, 9m, 1h); needs --checkpoint.")
@common_options
def distill_command(method: str, dataset: str, teacher: str, student: str, collected: int, source: str | None,
                    unbalanced: bool, iterations: int | None, batch_size: int | None, profile: str, seed: int,
                    sets: tuple[str, ...], amp: str, download: bool, as_json: bool, checkpoint: str | None,
                    resume: bool, stop_after: str | None, settings: Settings) -> None:
    """Distil a cached teacher into a student with one method.

    With --checkpoint PATH --resume an interrupted run (killed, preempted, or cut by --stop-after)
    continues where its last checkpoint stopped and ends with the same student as an uninterrupted
    run.  Exit code 0 when done, 2 for a bad value (also: an unreadable or foreign checkpoint),
    75 when --stop-after ended the time slice (run the same command again to continue).

    Example: dfkd-bench distill --method kd-collected --dataset mnist --teacher lenet5
    --student lenet5-half --collected 100 --iterations 2000
    """
    deadline = None
    if stop_after is not None:
        deadline = time.time() + parse_duration(stop_after)
        if checkpoint is None:
            raise DfkdError("--stop-after needs --checkpoint PATH (where the run continues from)")
    if resume and checkpoint is None:
        raise DfkdError("--resume needs --checkpoint PATH")
    ckpt = CheckpointConfig(Path(checkpoint), resume, deadline) if checkpoint is not None else None
    budget = Budget(collected=collected, source=source, balanced=not unbalanced, iterations=iterations,
                    batch_size=batch_size)
    spec = RunSpec(method, dataset, teacher, student, budget, profile, seed, tuple(parse_sets(sets).items()), amp)
    validate(spec, settings)
    bar = ProgressBar(f"{method} {dataset}")
    try:
        result, _ = execute(spec, settings, callbacks=[bar], download=download, checkpoint=ckpt)
    except SliceEnded as stop:
        bar.close()
        click.echo(f"{stop}; run the same command again to continue", err=True)
        sys.exit(EXIT_SLICE_ENDED)
    finally:
        bar.close()
    out = summary(spec, result)
    if as_json:
        out["history"] = [{"iteration": e.iteration, **e.metrics} for e in result.history]
        click.echo(json.dumps(out))
        return
    click.echo(f"{method} on {dataset} ({teacher} -> {student}), collected {collected}, profile {profile}, seed {seed}")
    click.echo(f"  test accuracy (last)      {100 * out['test_accuracy']:.2f}%")
    click.echo(f"  test accuracy (best val)  {100 * out['best_val_test_accuracy']:.2f}%")
    click.echo(f"  best val accuracy         {100 * out['best_val_accuracy']:.2f}%  (iteration {out['best_iteration']})")
    click.echo(f"  teacher test accuracy     {100 * out['teacher_accuracy']:.2f}%")
    click.echo(f"  deployed predictor        {out['student_parameters']:,.0f} parameters, "
               f"{out['student_flops'] / 1e6:.3g} MFLOPs per image (teacher {out['teacher_parameters']:,.0f}, "
               f"{out['teacher_flops'] / 1e6:.3g} MFLOPs)")
    click.echo(f"  training                  {out['train_flops']:.3g} FLOPs; images through teacher "
               f"{out['teacher_images']:,}, student {out['student_images']:,.0f}; generator steps "
               f"{out['generator_steps']:,.0f}")
    click.echo(f"  wall time                 {out['wall_seconds']:.1f} s")
    for name, reason in out["flags"].items():
        click.echo(f"  flag {name}: {reason}")
