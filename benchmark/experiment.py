"""One distillation run as the harness sees it: a spec, its validation, its execution, its summary.

Shared by ``dfkd-bench distill`` and the grid runner, so that both validate identically (every
bad value is rejected before anything is loaded or written) and report identically.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from methods.core.api import (
    Budget,
    DistillResult,
    TaskData,
    check_budget,
    check_collected_policy,
    check_teacher,
    distill,
    seed_everything,
)
from methods.core.checkpoint import CheckpointConfig
from methods.core.context import Callback
from methods.core.registry import get_method

from . import zoo
from .data import check_source, get_spec, load_task
from .settings import Settings
from .teachers import load_teacher, read_manifest


@dataclass(frozen=True)
class RunSpec:
    """What to run: method, dataset, teacher → student pair, budget, profile, seed, overrides."""

    method: str
    dataset: str
    teacher: str
    student: str
    budget: Budget = field(default_factory=Budget)
    profile: str = "quick"
    seed: int = 0
    overrides: tuple[tuple[str, Any], ...] = ()
    amp: str = "auto"

    @property
    def overrides_dict(self) -> dict[str, Any]:
        return dict(self.overrides)

    def identity(self) -> dict[str, Any]:
        """Method, dataset, teacher, student, profile, seed and amp: the plain fields that name a run."""
        return {name: getattr(self, name) for name in ("method", "dataset", "teacher", "student", "profile", "seed", "amp")}


def validate(spec: RunSpec, settings: Settings) -> dict[str, Any]:
    """Check every value of ``spec`` without side effects; returns the teacher's manifest.

    Raises a one-line :class:`DfkdError` for an unknown method, dataset or arch, a profile the
    method lacks, a bad override, a budget the method does not accept, or a missing teacher.
    """
    check(spec)
    return read_manifest(settings.results, spec.dataset, spec.teacher)


def check(spec: RunSpec) -> None:
    """The checks of :func:`validate` that need no teacher (a grid is checked before teachers exist).

    A budget the method does not accept raises :class:`BudgetError`, a pair it cannot use
    :class:`PairError` (a grid skips such cells), other bad values :class:`DfkdError`.
    """
    cls = get_method(spec.method)
    get_spec(spec.dataset)
    for arch in (spec.teacher, spec.student):
        zoo.check_arch(arch)
    cls.resolve_hparams(spec.profile, spec.dataset, spec.overrides_dict)
    check_collected_policy(spec.method, spec.budget.collected)
    if spec.budget.collected > 0:
        check_source(spec.dataset, spec.budget.source)
    if cls.needs_teacher_bn:
        data = get_spec(spec.dataset)
        check_teacher(spec.method, zoo.build(spec.teacher, data.num_classes or 10, data.channels))


def execute(
    spec: RunSpec,
    settings: Settings,
    callbacks: Sequence[Callback] = (),
    download: bool = False,
    data: TaskData | None = None,
    evaluate_test: bool = True,
    checkpoint: CheckpointConfig | None = None,
) -> tuple[DistillResult, dict[str, Any]]:
    """Load the cached teacher and the data (``download`` lets torchvision fetch), build the student (seeded), distil.

    ``data`` reuses a task already loaded with :func:`load_data` for this spec (the grid runner
    runs many cells on one dataset); by default it is loaded here.  ``evaluate_test=False``: see
    :func:`~methods.core.api.distill` (hyperparameter search never computes test accuracy).
    ``checkpoint``: resumable checkpointing and time slices (:class:`~methods.core.checkpoint.CheckpointConfig`).
    """
    manifest = validate(spec, settings)
    device = settings.torch_device
    teacher, manifest = load_teacher(settings.results, spec.dataset, spec.teacher)
    if data is None:
        data = load_data(spec, settings, manifest, download)
    check_budget(spec.method, spec.budget, data)
    seed_everything(spec.seed)
    student = zoo.build(spec.student, data.num_classes, data.channels)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = distill(
        teacher,
        student,
        spec.budget,
        method=spec.method,
        data=data,
        profile=spec.profile,
        overrides=spec.overrides_dict,
        seed=spec.seed,
        device=device,
        amp=spec.amp,
        callbacks=callbacks,
        evaluate_test=evaluate_test,
        checkpoint=checkpoint,
    )
    return result, manifest


def load_data(spec: RunSpec, settings: Settings, manifest: dict[str, Any], download: bool = False) -> TaskData:
    """The task data of ``spec``, normalized with its teacher's statistics, on the settings' device."""
    return load_task(spec.dataset, settings.data_dir, download=download, device=settings.torch_device,
                     mean=manifest["mean"], std=manifest["std"])


def summary(spec: RunSpec, result: DistillResult) -> dict[str, Any]:
    """The JSON object of a run (accuracies as fractions in [0, 1])."""
    return {
        "method": spec.method,
        "dataset": spec.dataset,
        "teacher": spec.teacher,
        "student": spec.student,
        "budget": dataclasses.asdict(result.budget),
        "profile": spec.profile,
        "seed": spec.seed,
        "test_accuracy": result.test_accuracy,
        "best_val_test_accuracy": result.best_val_test_accuracy,
        "best_val_accuracy": result.best_val_accuracy,
        "best_iteration": result.best_iteration,
        "teacher_accuracy": result.teacher_accuracy,
        "wall_seconds": result.wall_seconds,
        **result.accounting,
        "teacher_images": result.teacher_images,
        "hparams": result.hparams,
        "flags": result.flags,
    }
