"""The one public entry point: ``distill(teacher, student, budget, method=...)``."""
from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .accounting import deployed_size, parameter_count
from .checkpoint import CheckpointConfig, Checkpointer, fingerprint, weights_digest
from .context import Callback, CountingTeacher, DistillContext, Evaluation
from .errors import BudgetError, DfkdError, PairError
from .images import Augment, ImageSet, accuracy
from .layout import memory_format
from .method import CollectedUse
from .probe import REAL_PROBE_SAMPLES, silent_units
from .registry import get_method
from .syncguard import SyncGuard


@dataclass(frozen=True)
class Budget:
    """What a run may use: collected real examples and compute.

    ``collected``: how many real examples the method may see (0 = purely data-free); their labels
    are withheld.  ``source``: where they are drawn from, ``"<dataset>:<split>"`` (default: the
    teacher's own train-core).  ``balanced``: class-balanced draw.  ``iterations`` and
    ``batch_size`` override the method's recipe when given.
    """

    collected: int = 0
    source: str | None = None
    balanced: bool = True
    iterations: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.collected < 0:
            raise BudgetError(f"bad collected budget {self.collected}; allowed: an integer >= 0")
        for name in ("iterations", "batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise BudgetError(f"bad {name} {value}; allowed: an integer > 0")


class Collector(Protocol):
    """Draws the collected subset (the harness keeps the true labels to balance classes)."""

    def pool_size(self, source: str | None) -> int: ...

    def draw(self, n: int, seed: int, source: str | None, balanced: bool) -> ImageSet: ...


@dataclass
class TaskData:
    """A dataset as a method run needs it; built by ``benchmark.data.load_task``.

    ``train`` is labelled train-core (only for methods that declare ``uses_labelled_train``);
    ``val``/``test`` are for the harness only (spec §1.4).
    """

    dataset: str
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_augment: Augment
    val: ImageSet
    test: ImageSet
    train: ImageSet | None = None
    collector: Collector | None = None


@dataclass
class DistillResult:
    """What a run produced.  Accuracies are fractions in [0, 1]."""

    method: str
    dataset: str
    student: nn.Module
    predictor: nn.Module
    best_predictor: nn.Module
    test_accuracy: float
    best_val_test_accuracy: float
    best_val_accuracy: float
    best_iteration: int
    teacher_accuracy: float
    teacher_images: int
    wall_seconds: float
    history: list[Evaluation]
    hparams: dict[str, Any]
    budget: Budget
    profile: str
    seed: int
    artifacts: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)
    # Deployed size and training cost (spec §1.2, §2.1): the ACCOUNTING_KEYS, the per-role
    # breakdown (flops/<role>, samples/<role>, steps/<role>) and the totals a method recorded.
    accounting: dict[str, float] = field(default_factory=dict)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu``; ``cuda`` / ``cuda:N``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DfkdError(f"device {device!r} asked for, but CUDA is not available; allowed here: auto, cpu")
        return torch.device(device)
    raise DfkdError(f"bad device {device!r}; allowed: auto, cpu, cuda, cuda:N")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (spec §1.6; bitwise determinism not required)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)


def check_collected_policy(method: str, collected: int) -> None:
    """Reject a collected count the method's declared policy (none / optional / required) does not accept."""
    cls = get_method(method)
    use = cls.collected_use
    if use is CollectedUse.NONE and collected > 0:
        what = "trains on the labelled training set" if cls.uses_labelled_train else "is data-free"
        raise BudgetError(
            f"method {method!r} {what} and takes no collected examples; got collected={collected}, allowed: 0"
        )
    if use is CollectedUse.REQUIRED and collected == 0:
        raise BudgetError(f"method {method!r} needs collected examples; got collected=0, allowed: an integer > 0")


def check_teacher(method: str, teacher: nn.Module) -> None:
    """Refuse a teacher without BatchNorm layers for a method that matches BN statistics (spec §2.5)."""
    cls = get_method(method)
    if cls.needs_teacher_bn and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in teacher.modules()):
        raise PairError(
            f"method {method!r} matches the teacher's BatchNorm statistics, and this teacher has no BatchNorm "
            f"layer; allowed: a teacher with BatchNorm (on MNIST: lenet5-bn)"
        )


def check_budget(method: str, budget: Budget, data: TaskData) -> None:
    """Reject a budget the method does not accept or the pool cannot fill (one-line errors)."""
    check_collected_policy(method, budget.collected)
    if budget.collected > 0:
        if data.collector is None:
            raise BudgetError(f"dataset {data.dataset!r} has no pool to collect examples from")
        size = data.collector.pool_size(budget.source)
        if budget.collected > size:
            raise BudgetError(
                f"collected budget {budget.collected} exceeds the {size} examples of source "
                f"{budget.source or data.dataset + ':train'}; allowed: 0..{size}"
            )


def distill(
    teacher: nn.Module,
    student: nn.Module,
    budget: Budget,
    *,
    method: str,
    data: TaskData,
    profile: str = "quick",
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    amp: str = "auto",
    callbacks: Sequence[Callback] = (),
    evaluate_test: bool = True,
    checkpoint: CheckpointConfig | None = None,
    sync_debug: bool = False,
    stage_limit: int | None = None,
) -> DistillResult:
    """Distil ``teacher`` into ``student`` with the registered ``method`` under ``budget``.

    Hyperparameters: the method's paper defaults, then ``profile``'s recipe for the dataset, then
    ``overrides``, then the budget's ``iterations``/``batch_size``.  Evaluation follows spec §1.5:
    validation every ``eval_every`` iterations with best-val checkpointing, then test accuracy of
    the last and of the best-val predictor.  ``evaluate_test=False`` (hyperparameter search, spec
    §1.5) never touches the test split: the test accuracies are NaN and not reported.

    ``checkpoint``: write a resumable checkpoint at each evaluation and stage boundary (spec §6
    "Sizing"; :mod:`methods.core.checkpoint`), continue it when ``resume`` is set, end the time
    slice at ``deadline`` (raises :class:`~methods.core.errors.SliceEnded`); the file is removed
    when the run finishes.

    ``sync_debug``: run every iteration body under ``torch.cuda.set_sync_debug_mode("error")``, so a
    host-device synchronisation in a step loop raises (:mod:`methods.core.syncguard`; CUDA only,
    validation and logging exempt).  ``stage_limit`` ends every stage after that many iterations
    (for that check only: the result is not a run of the recipe).
    """
    cls = get_method(method)
    hparams = cls.resolve_hparams(profile, data.dataset, overrides)
    if budget.iterations is not None:
        hparams = dataclasses.replace(hparams, iterations=budget.iterations)
    if budget.batch_size is not None:
        hparams = dataclasses.replace(hparams, batch_size=budget.batch_size)
    check_budget(method, budget, data)
    check_teacher(method, teacher)
    dev = resolve_device(device)
    layout = memory_format(dev)  # a bad $DFKD_MEMORY_FORMAT fails here, before any work
    seed_everything(seed)

    counted = CountingTeacher(teacher.to(dev))
    student = student.to(dev).train()
    collected = None
    if budget.collected > 0:
        assert data.collector is not None
        collected = data.collector.draw(budget.collected, seed, budget.source, budget.balanced)
        collected = collected.without_labels().to(dev)
    labelled = None
    if cls.uses_labelled_train:
        if data.train is None:
            raise DfkdError(f"method {method!r} needs the labelled training set, which {data.dataset!r} lacks")
        labelled = data.train.to(dev)

    val = data.val.to(dev)

    def validate(predictor: nn.Module) -> float:
        return accuracy(predictor, val)

    def probe_real() -> dict[str, Tensor]:
        return {"probe/silent_units": silent_units(student, val.normalized()[:REAL_PROBE_SAMPLES])}

    ctx = DistillContext(
        teacher=counted,
        student=student,
        device=dev,
        num_classes=data.num_classes,
        channels=data.channels,
        size=data.size,
        mean=data.mean,
        std=data.std,
        train_augment=data.train_augment,
        _validate=validate,
        _probe_real=probe_real if hasattr(student, "features") else None,
        iterations=hparams.iterations,
        eval_every=max(1, min(hparams.eval_every, hparams.iterations)),
        collected_budget=budget.collected,
        amp=amp,
        memory_format=layout,
        callbacks=list(callbacks),
        _collected=collected,
        _labelled_train=labelled,
        sync_guard=SyncGuard(sync_debug, stage_limit),
    )
    info = {
        "method": method,
        "dataset": data.dataset,
        "profile": profile,
        "seed": seed,
        "hparams": dataclasses.asdict(hparams),
        "budget": dataclasses.asdict(budget),
        "device": str(dev),
    }
    if checkpoint is not None:
        expected = fingerprint(method=method, dataset=data.dataset, seed=seed, amp=amp,
                               hparams=dataclasses.asdict(hparams), budget=dataclasses.asdict(budget),
                               teacher=weights_digest(teacher), student=weights_digest(student))
        ctx.checkpointer = Checkpointer(checkpoint, expected, ctx.state_dict, ctx.load_state_dict)
        info["resumed_from"] = ctx.checkpointer.resumed_from
    for cb in ctx.callbacks:
        cb.on_start(info)
    ctx.keep(student=student)
    probe = torch.zeros(2, data.channels, data.size, data.size, device=dev)
    with ctx.accounting.active():
        ctx.track("teacher", counted.net, probe)
        ctx.track("student", student, probe)
        started = time.perf_counter()
        ctx.started = started
        try:
            cls(hparams).run(ctx)
        finally:
            ctx.sync_guard.close()
        if ctx.checkpointer is not None:
            ctx.checkpointer.check_consumed()
        if ctx.predictor is None:
            raise RuntimeError(f"method {method!r} never called ctx.watch(predictor)")
        if not ctx.history or ctx.history[-1].iteration != hparams.iterations:
            ctx.evaluate(hparams.iterations)
        wall = time.perf_counter() - ctx.started
    accounting = run_accounting(ctx, counted, probe)

    best = ctx.best_predictor()
    final: dict[str, float] = {}
    test_last = test_best = teacher_acc = float("nan")
    if evaluate_test:
        test = data.test.to(dev)
        test_last = accuracy(ctx.predictor, test)
        test_best = accuracy(best, test)
        teacher_acc = accuracy(counted.net, test)
        final = {"test_accuracy": test_last, "best_val_test_accuracy": test_best}
    final["best_val_accuracy"] = ctx.best_val_accuracy
    if evaluate_test:
        final["teacher_accuracy"] = teacher_acc
    final["wall_seconds"] = wall
    final.update(accounting)
    ctx.log_metrics(hparams.iterations, final)
    if ctx.checkpointer is not None:
        ctx.checkpointer.remove()
    return DistillResult(
        method=method,
        dataset=data.dataset,
        student=student,
        predictor=ctx.predictor,
        best_predictor=best,
        test_accuracy=test_last,
        best_val_test_accuracy=test_best,
        best_val_accuracy=ctx.best_val_accuracy,
        best_iteration=ctx.best_iteration,
        teacher_accuracy=teacher_acc,
        teacher_images=counted.images,
        wall_seconds=wall,
        history=ctx.history,
        hparams=dataclasses.asdict(hparams),
        budget=budget,
        profile=profile,
        seed=seed,
        artifacts=ctx.artifacts,
        flags=ctx.flags,
        accounting=accounting,
    )


def run_accounting(ctx: DistillContext, teacher: CountingTeacher, probe: torch.Tensor) -> dict[str, float]:
    """Deployed size of predictor and teacher, and the run's training cost (spec §1.2, §2.1, §6)."""
    assert ctx.predictor is not None
    student_parameters, student_flops = deployed_size(ctx.predictor, probe)
    teacher_flops = deployed_size(teacher.net, probe)[1]
    out = {
        "student_parameters": float(student_parameters),
        "student_flops": student_flops,
        "teacher_parameters": float(parameter_count(list(teacher.net.modules()))),
        "teacher_flops": teacher_flops,
        "teacher_images": float(teacher.images),
    }
    out.update(ctx.accounting.totals())
    out.update(ctx.totals)
    return out
