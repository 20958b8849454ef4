"""What a method sees while it trains: frozen teacher, student, budgeted data, evaluation, callbacks.

The harness owns the loop's chores (spec §1.5, §1.6): counting teacher images, AMP, periodic
validation with best-val checkpointing, loss accumulation without per-step host syncs, and
reporting through callbacks.  Methods express only their losses and update order.
"""
from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .accounting import Accountant
from .checkpoint import Checkpointer
from .errors import BudgetError
from .images import Augment, ImageSet, channel_stats
from .meters import LossMeter
from .probe import score_batch
from .syncguard import SyncGuard


class Callback(Protocol):
    """Receives what a run reports; every hook is optional (see :class:`BaseCallback`)."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_progress(self, iteration: int, total: int) -> None: ...
    def on_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_artifact(self, name: str, value: Any) -> None: ...


class BaseCallback:
    """No-op implementation of :class:`Callback`, to subclass."""

    def on_start(self, info: dict[str, Any]) -> None:
        pass

    def on_progress(self, iteration: int, total: int) -> None:
        pass

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_artifact(self, name: str, value: Any) -> None:
        pass


class CountingTeacher(nn.Module):
    """The frozen teacher (eval mode, no parameter gradients) that counts the images it is shown.

    The count is a Python int built from tensor shapes, so it costs no host sync.  Gradients still
    flow *through* it to the input when a generator loss needs them (spec §1.6).  ``last_input``
    references (detached, no copy) the last batch it was shown, for the evaluation-time probe
    (:mod:`methods.core.probe`).
    """

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.net = teacher.eval().requires_grad_(False)
        self.images = 0
        self.last_input: Tensor | None = None
        self.train(False)

    def train(self, mode: bool = True) -> CountingTeacher:
        # The teacher stays in eval mode whatever a method asks (its BN uses running statistics).
        super().train(False)
        return self

    def _seen(self, x: Tensor) -> Tensor:
        self.images += x.shape[0]
        self.last_input = x.detach()
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self._seen(x))

    def features(self, x: Tensor) -> Any:
        """The zoo interface (logits, vec, map, stages) in one forward; counted."""
        return self.net.features(self._seen(x))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["net"], name)


@dataclass
class Evaluation:
    """One validation evaluation."""

    iteration: int
    metrics: dict[str, float]


@dataclass
class DistillContext:
    """Everything a method may use.  Build through :func:`methods.distill`, not by hand.

    Labelled validation and test data are not on the context (spec §1.4: harness only): the
    harness passes ``_validate``, a function that scores a predictor, and keeps the data itself.
    """

    teacher: CountingTeacher
    student: nn.Module
    device: torch.device
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_augment: Augment
    _validate: Callable[[nn.Module], float]
    iterations: int
    eval_every: int
    collected_budget: int = 0
    amp: str = "auto"
    memory_format: torch.memory_format = torch.contiguous_format  # of every network (methods.core.layout)
    callbacks: list[Callback] = field(default_factory=list)
    _collected: ImageSet | None = None
    _labelled_train: ImageSet | None = None
    _probe_real: Callable[[], dict[str, Tensor]] | None = None  # harness diagnostics on held-out real images
    # state
    history: list[Evaluation] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)
    best_val_accuracy: float = -1.0
    best_iteration: int = 0
    best_state: dict[str, Tensor] | None = None
    predictor: nn.Module | None = None
    networks: dict[str, list[nn.Module]] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)
    accounting: Accountant = field(default_factory=Accountant)
    _losses: LossMeter = field(default_factory=LossMeter)
    _last_eval: int = -1
    started: float = field(default_factory=time.perf_counter)
    checkpointer: Checkpointer | None = None
    sync_guard: SyncGuard = field(default_factory=lambda: SyncGuard(False))

    # ------------------------------------------------------------------ data access
    def collected(self, n: int | None = None) -> ImageSet:
        """The budgeted collected examples, labels withheld (spec §1.4); asking for more is an error."""
        if n is None:
            n = self.collected_budget
        if n > self.collected_budget or self._collected is None or n <= 0:
            raise BudgetError(
                f"method asked for {n} collected examples; the budget allows {self.collected_budget}"
            )
        if n == len(self._collected):
            return self._collected
        return self._collected.subset(torch.arange(n))

    def labelled_train(self) -> ImageSet:
        """Train-core with true labels: teacher training and KD-ORI only (spec §1.4)."""
        if self._labelled_train is None:
            raise BudgetError("this method is not allowed the labelled training set")
        return self._labelled_train

    def normalize(self, pixels: Tensor) -> Tensor:
        """Map pixel-space images in [0, 1] to the teacher's normalized space (spec §1.3)."""
        mean, std = channel_stats(tuple(self.mean), tuple(self.std), pixels.device, pixels.dtype)
        return (pixels - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: back to pixel space (for sample grids)."""
        mean, std = channel_stats(tuple(self.mean), tuple(self.std), x.device, x.dtype)
        return x * std + mean

    # ------------------------------------------------------------------ numerics
    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast on CUDA (spec §1.6), fp32 on CPU unless ``amp='bf16'`` asks for it."""
        enabled = (self.device.type == "cuda" and self.amp in ("auto", "bf16")) or (
            self.device.type == "cpu" and self.amp == "bf16"
        )
        if enabled:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    # ------------------------------------------------------------------ resumable state (methods.core.checkpoint)
    def keep(self, **objects: Any) -> None:
        """Declare resumable state right after building it (spec §6 "Sizing"): modules, optimizers,
        schedulers, ``torch.Generator`` s, objects with ``state_dict``/``load_state_dict``.

        When a checkpoint is being resumed, the saved state is loaded into each object at once.
        """
        if self.checkpointer is not None:
            self.checkpointer.keep(objects)

    def steps(self, n: int, stage: str = "main", every: int | None = None) -> Iterator[int]:
        """The iterations ``1..n`` of a stage, to loop over instead of ``range(1, n + 1)``.

        After a resume, it starts after the checkpointed iteration (a finished stage yields nothing)
        and restores all RNG and context state just before that iteration.  The checkpoint is written
        after an iteration whose ``end_iteration`` evaluated, every ``every`` iterations (stages that
        do not evaluate, e.g. a GAN stage), and when the time slice ends.
        """
        iterations = range(1, n + 1) if self.checkpointer is None else self.checkpointer.steps(n, stage, every)
        return self.sync_guard.loop(iterations)

    def once(self, name: str, fn: Callable[[], Any]) -> Any:
        """A stage-boundary product (tensors or containers of tensors): ``fn()`` once, then from the checkpoint."""
        if self.checkpointer is None:
            return fn()
        return self.checkpointer.once(name, fn)

    def state_dict(self) -> dict[str, Any]:
        """The harness's own state: history, best-val state, counters, flags, loss sums, elapsed wall time."""
        return {
            "history": [[e.iteration, dict(e.metrics)] for e in self.history],
            "best_val_accuracy": self.best_val_accuracy,
            "best_iteration": self.best_iteration,
            "best_state": self.best_state,
            "flags": dict(self.flags),
            "totals": dict(self.totals),
            "accounting": self.accounting.state_dict(),
            "teacher_images": self.teacher.images,
            "losses": self._losses.state_dict(),
            "last_eval": self._last_eval,
            "elapsed": time.perf_counter() - self.started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (loss sums back onto the run's device; wall time continues)."""
        self.history = [Evaluation(int(it), dict(metrics)) for it, metrics in state["history"]]
        self.best_val_accuracy = state["best_val_accuracy"]
        self.best_iteration = state["best_iteration"]
        self.best_state = state["best_state"]
        self.flags = dict(state["flags"])
        self.totals = dict(state["totals"])
        self.accounting.load_state_dict(state["accounting"])
        self.teacher.images = state["teacher_images"]
        losses = state["losses"]
        self._losses.load_state_dict({"sums": {k: v.to(self.device) for k, v in losses["sums"].items()},
                                      "counts": losses["counts"]})
        self._last_eval = state["last_eval"]
        self.started = time.perf_counter() - state["elapsed"]

    # ------------------------------------------------------------------ reporting
    def watch(self, predictor: nn.Module) -> None:
        """Declare the module that predicts (student, or e.g. backbone + projector + teacher head)."""
        self.predictor = predictor

    def end_iteration(self, iteration: int, losses: dict[str, Tensor] | None = None) -> None:
        """Record this iteration's losses (kept on device) and validate every ``eval_every``.

        ``iteration`` counts from 1.  Validation also runs at the last iteration.
        """
        for key, value in (losses or {}).items():
            self._losses.add(key, value)
        for cb in self.callbacks:
            cb.on_progress(iteration, self.iterations)
        if iteration % self.eval_every == 0 or iteration == self.iterations:
            self.evaluate(iteration)
            if self.checkpointer is not None:
                self.checkpointer.request = True  # written after this iteration's body (ctx.steps)

    def evaluate(self, iteration: int) -> dict[str, float]:
        """Validate the predictor now; keep a copy of its state on strict improvement (spec §1.5)."""
        if self.predictor is None:
            raise RuntimeError("method never called ctx.watch(predictor)")
        if iteration == self._last_eval:
            return self.history[-1].metrics
        with self.sync_guard.allowed():
            return self._evaluate(iteration)

    def _evaluate(self, iteration: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self._losses:
            means = self._losses.means(f"at iteration {iteration}")
            metrics.update({f"loss/{key}": value for key, value in means.items()})
        with self.accounting.paused():
            val_acc = self._validate(self.predictor)
            seen = self.teacher.last_input
            probe = score_batch(self.teacher.net, self.predictor, seen, self.num_classes) if seen is not None else {}
            if self._probe_real is not None:
                probe.update(self._probe_real())
        metrics["val_accuracy"] = val_acc
        metrics.update(zip(probe, torch.stack(list(probe.values())).tolist()) if probe else {})
        if val_acc > self.best_val_accuracy:
            self.best_val_accuracy = val_acc
            self.best_iteration = iteration
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.predictor.state_dict().items()}
        metrics["best_val_accuracy"] = self.best_val_accuracy
        metrics["teacher_images"] = float(self.teacher.images)
        metrics["wall_seconds"] = time.perf_counter() - self.started
        self.history.append(Evaluation(iteration, metrics))
        self._last_eval = iteration
        self.log_metrics(iteration, metrics)
        return metrics

    def log_metrics(self, step: int, metrics: dict[str, float | Tensor]) -> None:
        """Report metrics at ``step`` (tensors are synced here: call sparsely, not per step)."""
        with self.sync_guard.allowed():
            floats = {k: float(v) for k, v in metrics.items()}
            for cb in self.callbacks:
                cb.on_metrics(step, floats)

    def track(self, role: str, module: nn.Module, *example: Tensor) -> nn.Module:
        """Declare a network the method forwards besides the teacher and student (spec §1.2, §2.1).

        ``role``: e.g. ``generator``, ``discriminator``, ``projector`` (several modules may share one).
        ``example``: the inputs of one forward call (any batch size), used once to measure the FLOPs
        per sample; none for a module that costs nothing (e.g. optimised pixels).  The harness counts
        the samples every tracked network processes, the optimizer steps on its parameters
        (``steps/<role>``; ``generator_steps`` for role ``generator``) and the training FLOPs.
        The module is put in the run's ``memory_format`` (:mod:`methods.core.layout`).  Returns ``module``.
        """
        module.to(memory_format=self.memory_format)
        self.networks.setdefault(role, []).append(module)
        self.accounting.track(role, module, *example)
        return module

    def record(self, key: str, value: float) -> None:
        """A run-level total the method alone knows (e.g. ``synthetic_images``), reported with the results."""
        with self.sync_guard.allowed():
            self.totals[key] = float(value)

    def add_artifact(self, name: str, value: Any) -> None:
        """Attach something to show (e.g. a uint8 sample grid from ``torchvision.utils.make_grid``)."""
        with self.sync_guard.allowed():
            self.artifacts[name] = value
            for cb in self.callbacks:
                cb.on_artifact(name, value)

    def flag(self, name: str, reason: str) -> None:
        """Mark the run (e.g. ``bn_loss_unavailable``), shown in results and tracking."""
        self.flags[name] = reason

    def best_predictor(self) -> nn.Module:
        """A copy of the predictor with its best-validation weights."""
        assert self.predictor is not None
        best = copy.deepcopy(self.predictor)
        if self.best_state is not None:
            best.load_state_dict(self.best_state)
        return best
