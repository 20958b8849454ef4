"""Throughput of a registered method's training loop: iterations/s and teacher images/s.

    python -m benchmark.speed dfad --profile paper --dataset mnist --iterations 50 --device cpu \\
        --compare "base,amp=bf16,threads=1,malloc=tuned+threads=1"

A benchmark script, not a test.  It times ``distill`` itself (the method's real loop, including
``end_iteration``) on synthetic images of the dataset's shape, so no dataset is needed: the
teacher is the cached one when ``--results`` holds it, otherwise a randomly initialised network of
the method's declared pair for the dataset (``default_pairs``, e.g. LeNet-5-BN → LeNet-5-half for
the inversion methods), else the dataset's default pair (LeNet-5 → LeNet-5-half for 1-channel data,
ResNet-34 → ResNet-18 otherwise).  Rates a method logs itself (metrics ending in ``_per_second``,
e.g. DeepInversion's ``synthesis_images_per_second`` and ``kd_steps_per_second``) are printed too;
they cover the whole run as the method measured it.  Validation runs only after the last iteration, outside the timed window, and the
first ``--warmup`` iterations (allocation, ``torch.compile``) are not timed either.

Variants (``--compare``, comma-separated; each a ``+``-joined list of ``key=value``, or ``base``):
``amp=auto|off|bf16``; ``threads=N`` (torch intra-op threads); ``malloc=tuned|default|env``
(``tuned``, the default as in ``dfkd-bench``: :func:`benchmark.cpu_tuning.tune_malloc`; ``default``:
glibc as shipped; ``env``: glibc's ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2**36``, spec §6);
``env.NAME=VALUE``; any other key is a hyperparameter override of the method (as ``--set``).  Every measurement runs in a fresh
process, and variants are interleaved round by round, so that on a shared machine each ratio
compares runs made at nearly the same time: ratios are the median over rounds of the per-round
ratio to the first variant.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**36)}
MALLOC_VARIANTS = {
    "tuned": {"DFKD_MALLOC": "tuned"},
    "default": {"DFKD_MALLOC": "default"},
    "env": {"DFKD_MALLOC": "default", **MALLOC_ENV},
}
SYNTHETIC_IMAGES = 512  # val/test/train-pool size of the synthetic task (timing needs no real data)


def default_pair(channels: int) -> tuple[str, str]:
    """The spec's default teacher → student pair for a dataset with ``channels`` channels."""
    return ("lenet5", "lenet5-half") if channels == 1 else ("resnet34", "resnet18")


def parse_variant(text: str) -> dict[str, str]:
    """``"amp=bf16+threads=1"`` → ``{"amp": "bf16", "threads": "1"}``; ``"base"`` → ``{}``."""
    from methods.core.errors import DfkdError

    text = text.strip()
    if text in ("", "base"):
        return {}
    out: dict[str, str] = {}
    for item in text.split("+"):
        if "=" not in item:
            raise DfkdError(f"bad variant setting {item!r} in {text!r}; expected key=value (or 'base')")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def variant_name(settings: dict[str, str]) -> str:
    return "+".join(f"{k}={v}" for k, v in settings.items()) or "base"


# ----------------------------------------------------------------------------- worker (one measurement)
class _Timer:
    """Callback: a timestamp and the teacher's image count at every iteration."""

    def __init__(self, probe: dict[str, int]) -> None:
        self.probe = probe
        self.marks: list[tuple[int, float, int]] = []
        self.rates: dict[str, float] = {}  # rates a method logs itself (e.g. synthesis_images_per_second)

    def on_start(self, info: dict[str, Any]) -> None:
        pass

    def on_progress(self, iteration: int, total: int) -> None:
        self.marks.append((iteration, time.perf_counter(), self.probe["images"]))

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.rates.update({k: v for k, v in metrics.items() if k.endswith("_per_second")})

    def on_artifact(self, name: str, value: Any) -> None:
        pass


def _count_teacher_images(teacher: nn.Module) -> dict[str, int]:
    """Count the images the teacher is shown (forward and ``features``), as a Python int."""
    probe = {"images": 0}
    forward, features = teacher.forward, teacher.features

    def counted_forward(x: torch.Tensor) -> torch.Tensor:
        probe["images"] += x.shape[0]
        return forward(x)

    def counted_features(x: torch.Tensor) -> Any:
        probe["images"] += x.shape[0]
        return features(x)

    teacher.forward = counted_forward  # type: ignore[method-assign]
    teacher.features = counted_features  # type: ignore[method-assign]
    return probe


def synthetic_task(dataset: str, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Any:
    """A TaskData of random uint8 images with the dataset's shape and statistics."""
    from methods.core.api import TaskData
    from methods.core.images import ImageSet

    from .data import PoolCollector, get_spec

    spec = get_spec(dataset)
    classes = spec.num_classes or 10
    gen = torch.Generator().manual_seed(0)

    def image_set() -> ImageSet:
        pixels = torch.randint(0, 256, (SYNTHETIC_IMAGES, spec.channels, spec.size, spec.size), generator=gen,
                               dtype=torch.uint8)
        labels = torch.randint(0, classes, (SYNTHETIC_IMAGES,), generator=gen)
        return ImageSet(pixels.to(device), labels.to(device), spec.size, mean, std)

    train = image_set()

    def no_other_pool(key: str) -> ImageSet:
        raise ValueError(f"the speed benchmark has no pool {key!r}")

    return TaskData(dataset, classes, spec.channels, spec.size, mean, std, spec.train_augment, image_set(), image_set(),
                    train, PoolCollector(dataset, train, no_other_pool))


def prepare(job: dict[str, Any]) -> dict[str, Any]:
    """The teacher, student, synthetic data and overrides of one ``job`` (shared with :mod:`benchmark.sync_check`)."""
    from methods.core.api import resolve_device, seed_everything

    from . import zoo
    from .cpu_tuning import tune_malloc
    from .data import get_spec
    from .teachers import load_teacher, teacher_dir

    tune_malloc()  # as dfkd-bench does
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    device = resolve_device(job["device"])
    spec = get_spec(job["dataset"])
    teacher_arch, student_arch = job["teacher"], job["student"]
    results = Path(job["results"]) if job.get("results") else None
    seed_everything(job["seed"])
    if results is not None and (teacher_dir(results, job["dataset"], teacher_arch) / "manifest.json").is_file():
        teacher, manifest = load_teacher(results, job["dataset"], teacher_arch)
        mean, std, teacher_source = tuple(manifest["mean"]), tuple(manifest["std"]), "cached"
    else:
        teacher = zoo.build(teacher_arch, spec.num_classes or 10, spec.channels).eval()
        mean, std, teacher_source = spec.mean, spec.std, "random init"
    probe = _count_teacher_images(teacher)
    data = synthetic_task(job["dataset"], mean, std, device)
    student = zoo.build(student_arch, data.num_classes, data.channels)
    overrides = dict(job["overrides"])
    overrides.setdefault("eval_every", job["iterations"])  # validate once, after the timed window
    return {"teacher": teacher, "student": student, "data": data, "device": device, "overrides": overrides,
            "probe": probe, "teacher_source": teacher_source}


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Run one timed ``distill`` as ``job`` describes; returns per-iteration timings."""
    from methods.core.api import Budget, distill
    from methods.core.registry import get_method

    run = prepare(job)
    overrides, teacher_source = run["overrides"], run["teacher_source"]
    hparams = get_method(job["method"]).resolve_hparams(job["profile"], job["dataset"], overrides)
    timer = _Timer(run["probe"])
    budget = Budget(collected=job["collected"], iterations=job["iterations"])
    distill(run["teacher"], run["student"], budget, method=job["method"], data=run["data"], profile=job["profile"],
            overrides=overrides, seed=job["seed"], device=run["device"], amp=job["amp"], callbacks=[timer])
    (i0, t0, n0), (i1, t1, n1) = timer.marks[job["warmup"] - 1], timer.marks[-1]
    return {
        "seconds_per_iteration": (t1 - t0) / (i1 - i0),
        "teacher_images_per_second": (n1 - n0) / (t1 - t0),
        "timed_iterations": i1 - i0,
        "batch_size": hparams.batch_size,
        "threads": torch.get_num_threads(),
        "teacher_source": teacher_source,
        "method_rates": timer.rates,
    }


# ----------------------------------------------------------------------------- driver
def _job(base: dict[str, Any], settings: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The worker job and extra environment of one variant."""
    job = dict(base, overrides=dict(base["overrides"]))
    env: dict[str, str] = {}
    for key, value in settings.items():
        if key == "amp":
            job["amp"] = value
        elif key == "threads":
            job["threads"] = int(value)
        elif key == "malloc":
            if value not in MALLOC_VARIANTS:
                from methods.core.errors import DfkdError

                raise DfkdError(f"bad malloc={value!r}; allowed: {', '.join(MALLOC_VARIANTS)}")
            env.update(MALLOC_VARIANTS[value])
        elif key.startswith("env."):
            env[key[4:]] = value
        else:
            job["overrides"][key] = value
    return job, env


def _run_worker(job: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    full_env = dict(os.environ, **env)
    root = str(Path(__file__).resolve().parents[1])
    full_env["PYTHONPATH"] = root + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmark.speed", "--worker", json.dumps(job)],
                          capture_output=True, text=True, env=full_env, cwd=root)
    if proc.returncode != 0:
        raise click.ClickException(f"measurement failed ({job}, env {env}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("method", required=False)
@click.option("--profile", default="paper", show_default=True)
@click.option("--dataset", default="mnist", show_default=True)
@click.option("--teacher", default=None, help="Teacher arch (default: the dataset's default pair).")
@click.option("--student", default=None, help="Student arch (default: the dataset's default pair).")
@click.option("--iterations", type=click.IntRange(min=2), default=50, show_default=True)
@click.option("--warmup", type=click.IntRange(min=1), default=2, show_default=True, help="Untimed first iterations.")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True, help="Interleaved repetitions.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--amp", type=click.Choice(["auto", "bf16", "off"]), default="auto", show_default=True)
@click.option("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
@click.option("--collected", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Hyperparameter override for every variant.")
@click.option("--compare", default="base", show_default=True, help="Comma-separated variants (see module doc).")
@click.option("--results", envvar="DFKD_RESULTS", default=None, help="Results folder holding cached teachers.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--worker", default=None, hidden=True)
def main(method: str | None, profile: str, dataset: str, teacher: str | None, student: str | None, iterations: int,
         warmup: int, rounds: int, device: str, amp: str, threads: int | None, collected: int, seed: int,
         sets: tuple[str, ...], compare: str, results: str | None, as_json: bool, worker: str | None) -> None:
    """Time METHOD's training loop (iterations/s, teacher images/s) and compare variants in one run."""
    if worker is not None:
        click.echo(json.dumps(measure(json.loads(worker))))
        return
    from methods.core.errors import DfkdError
    from methods.core.registry import get_method

    from .cli.app import parse_sets
    from .data import get_spec

    try:
        if method is None:
            raise DfkdError("missing METHOD")
        cls = get_method(method)
        if iterations <= warmup:
            raise DfkdError(f"--iterations {iterations} leaves nothing to time after --warmup {warmup}")
        spec = get_spec(dataset)
        pair = cls.default_pairs.get(dataset) or default_pair(spec.channels)
        variants = [parse_variant(v) for v in compare.split(",")]
        base = {
            "method": method, "profile": profile, "dataset": dataset, "teacher": teacher or pair[0],
            "student": student or pair[1], "iterations": iterations, "warmup": warmup, "device": device, "amp": amp,
            "threads": threads, "collected": collected, "seed": seed, "overrides": parse_sets(sets),
            "results": str(Path(results).resolve()) if results else None,
        }
        jobs = [_job(base, v) for v in variants]
        for job, _ in jobs:  # reject bad overrides before any measurement
            cls.resolve_hparams(profile, dataset, job["overrides"])
    except DfkdError as error:
        raise click.UsageError(str(error)) from None

    names = [variant_name(v) for v in variants]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(rounds):
        for name, (job, env) in zip(names, jobs, strict=True):
            runs[name].append(_run_worker(job, env))
            last = runs[name][-1]
            click.echo(f"round {r + 1}/{rounds} {name}: {last['seconds_per_iteration']:.3f} s/it", err=True)

    first = names[0]
    rows = []
    for name in names:
        secs = [m["seconds_per_iteration"] for m in runs[name]]
        ratios = [a["seconds_per_iteration"] / b["seconds_per_iteration"] for a, b in zip(runs[first], runs[name], strict=True)]
        rows.append({
            "variant": name,
            "seconds_per_iteration": statistics.median(secs),
            "iterations_per_second": 1 / statistics.median(secs),
            "teacher_images_per_second": statistics.median(m["teacher_images_per_second"] for m in runs[name]),
            "speedup_vs_first": statistics.median(ratios),
            "per_round_seconds": secs,
            "threads": runs[name][0]["threads"],
            "method_rates": {k: statistics.median(m["method_rates"][k] for m in runs[name])
                             for k in runs[name][0]["method_rates"]},
        })
    meta = runs[first][0]
    header = {
        "method": method, "profile": profile, "dataset": dataset, "teacher": base["teacher"],
        "student": base["student"], "teacher_source": meta["teacher_source"], "batch_size": meta["batch_size"],
        "device": device, "iterations": iterations, "timed_iterations": meta["timed_iterations"], "rounds": rounds,
        "sets": base["overrides"], "load_average": os.getloadavg(), "cpu_count": os.cpu_count(),
    }
    if as_json:
        click.echo(json.dumps({**header, "variants": rows}))
        return
    click.echo(f"{method} / {profile} / {dataset}: {base['teacher']} ({meta['teacher_source']}) -> {base['student']}, "
               f"B {meta['batch_size']}, device {device}, {meta['timed_iterations']} timed iterations after {warmup} "
               f"warm-up, {rounds} round(s); load average {header['load_average'][0]:.1f} on {os.cpu_count()} CPUs")
    click.echo(f"{'variant':<34}{'threads':>8}{'s/it':>10}{'it/s':>9}{'teacher img/s':>15}{'speed-up':>10}")
    for row in rows:
        click.echo(f"{row['variant']:<34}{row['threads']:>8}{row['seconds_per_iteration']:>10.3f}"
                   f"{row['iterations_per_second']:>9.3f}{row['teacher_images_per_second']:>15,.0f}"
                   f"{row['speedup_vs_first']:>9.2f}x")
        for key, value in row["method_rates"].items():
            click.echo(f"{'':<4}{key} (whole run, as the method measured it): {value:,.2f}")
    click.echo(f"speed-up: median over rounds of the per-round ratio to {first!r} (same run, interleaved)")


if __name__ == "__main__":
    main()
