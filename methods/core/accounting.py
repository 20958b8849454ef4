"""What a run cost and what it deploys: parameters, FLOPs, samples and steps (spec §1.2, §2.1, §6).

Counting rules (spec §6 "Counting"):

- FLOPs per sample of a network are measured once with
  :class:`torch.utils.flop_counter.FlopCounterMode` on an example forward (convolutions and matrix
  products; a multiply-add is 2 FLOPs; normalisation, activations, pooling and losses are not
  counted).
- Every forward a network runs during training is counted from the batch size of its input:
  forward only (no autograd graph, e.g. under ``no_grad``) costs F per sample; a forward that
  builds a graph costs 3F when the network's parameters are being trained (forward + gradients
  w.r.t. inputs and weights) and 2F when it only passes the gradient to its input (a frozen
  teacher or student inside a generator step).  ``train_flops`` is the sum over every network the
  run declared (teacher, student, and what the method passes to ``ctx.track``).
- The harness's own evaluation (validation, test) is not training compute and is not counted.
- An optimizer step counts once for every role whose parameters it updates (``steps/<role>``).

The counts are Python integers built from tensor shapes inside forward pre-hooks: no host sync.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.hooks import RemovableHandle

# The keys every run reports (distill --json, MLflow metrics, grid outcomes, tables).
DEPLOYED_KEYS = ("student_parameters", "student_flops", "teacher_parameters", "teacher_flops")
TRAINING_KEYS = ("teacher_images", "student_images", "generator_steps", "train_flops")
ACCOUNTING_KEYS = DEPLOYED_KEYS + TRAINING_KEYS


def _leaves(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if not list(m.children())]


@dataclass
class Probe:
    """One example forward of a module: FLOPs per sample, the leaf modules it ran, the first of them."""

    flops_per_sample: float
    executed: list[nn.Module]

    @property
    def first(self) -> nn.Module | None:
        return self.executed[0] if self.executed else None


@torch.no_grad()
def probe(module: nn.Module, *example: Any) -> Probe:
    """Run ``module(*example)`` once in eval mode under FlopCounterMode (spec §6 counting).

    Eval mode keeps BatchNorm running statistics (and spectral-norm power iterations) untouched;
    the module's mode is restored afterwards.
    """
    executed: list[nn.Module] = []
    seen: set[int] = set()

    def note(mod: nn.Module, args: Any) -> None:
        if id(mod) not in seen:
            seen.add(id(mod))
            executed.append(mod)

    handles = [leaf.register_forward_pre_hook(note) for leaf in _leaves(module)]
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            module(*example)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    batch = example[0].shape[0] if example and isinstance(example[0], Tensor) and example[0].ndim else 1
    return Probe(counter.get_total_flops() / batch, executed)


def parameter_count(modules: list[nn.Module]) -> int:
    """Distinct parameters (elements) of ``modules`` (a parameter shared by two counts once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters(recurse=False):
            seen[id(p)] = p.numel()
    return sum(seen.values())


def deployed_size(predictor: nn.Module, example: Tensor) -> tuple[int, float]:
    """(parameters, forward FLOPs per image) of the predictor whose accuracy is reported (spec §2.1).

    Only the layers its forward runs count: for SimKD that is student backbone + projector + the
    teacher's head, not the student's own unused classifier.
    """
    result = probe(predictor, example)
    return parameter_count(result.executed), result.flops_per_sample


@dataclass
class NetworkMeter:
    """The samples one network processed, by cost class (F, 2F, 3F per sample)."""

    role: str
    module: nn.Module
    flops_per_sample: float
    forward_only: int = 0
    input_grad: int = 0
    trained: int = 0
    _params: list[nn.Parameter] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return self.forward_only + self.input_grad + self.trained

    @property
    def flops(self) -> float:
        return self.flops_per_sample * (self.forward_only + 2 * self.input_grad + 3 * self.trained)


class Accountant:
    """Counts what a run spends, through hooks on the networks it declares (spec §1.2 "Log per run")."""

    def __init__(self) -> None:
        self.meters: list[NetworkMeter] = []
        self.steps: dict[str, int] = {}
        self.counting = True
        self._handles: list[RemovableHandle] = []
        # Keyed by the optimizer object itself (weakly), never by id(): a freed optimizer's id is reused by
        # the next one, which then inherited the dead one's roles (a student step counted as a generator step).
        self._roles_of: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[str, ...]] = weakref.WeakKeyDictionary()
        self._tracked: set[int] = set()

    # ------------------------------------------------------------------ declaring networks
    def track(self, role: str, module: nn.Module, *example: Any) -> None:
        """Measure ``module``'s FLOPs per sample on ``example`` and count its forwards from now on."""
        if id(module) in self._tracked:
            return
        self._tracked.add(id(module))
        meter = NetworkMeter(role, module, 0.0, _params=list(module.parameters()))
        self.meters.append(meter)
        self._roles_of.clear()  # optimizers are mapped to roles again on their next step
        if not example:
            return
        result = probe(module, *example)
        meter.flops_per_sample = result.flops_per_sample
        if result.first is not None:
            self._handles.append(result.first.register_forward_pre_hook(self._counter(meter)))

    def _counter(self, meter: NetworkMeter) -> Any:
        def count(mod: nn.Module, args: Any) -> None:
            if not self.counting or not args or not isinstance(args[0], Tensor):
                return
            n = args[0].shape[0] if args[0].ndim else 1
            if not torch.is_grad_enabled():
                meter.forward_only += n
            elif any(p.requires_grad for p in meter._params):
                meter.trained += n
            elif args[0].requires_grad:
                meter.input_grad += n
            else:
                meter.forward_only += n

        return count

    # ------------------------------------------------------------------ optimizer steps
    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.counting:
            return
        roles = self._roles_of.get(optimizer)
        if roles is None:
            params = {id(p) for group in optimizer.param_groups for p in group["params"]}
            roles = tuple(dict.fromkeys(m.role for m in self.meters if any(id(p) in params for p in m._params)))
            self._roles_of[optimizer] = roles
        for role in roles:
            self.steps[role] = self.steps.get(role, 0) + 1

    @contextlib.contextmanager
    def active(self) -> Iterator[Accountant]:
        """Count optimizer steps while the block runs; remove every hook afterwards."""
        handle = register_optimizer_step_post_hook(self._on_step)
        try:
            yield self
        finally:
            handle.remove()
            for h in self._handles:
                h.remove()
            self._handles.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Do not count inside the block (the harness's evaluation)."""
        before = self.counting
        self.counting = False
        try:
            yield
        finally:
            self.counting = before

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The counts so far (per declared network, in declaration order, and per role's optimizer steps)."""
        return {"meters": [[m.role, m.forward_only, m.input_grad, m.trained] for m in self.meters],
                "steps": dict(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s counts into the networks declared so far (same order and roles)."""
        saved = state["meters"]
        if len(saved) > len(self.meters) or any(role != m.role for (role, *_), m in zip(saved, self.meters)):
            raise ValueError(f"declared networks {[m.role for m in self.meters]} do not match the saved "
                             f"{[row[0] for row in saved]}")
        for meter, (_, forward_only, input_grad, trained) in zip(self.meters, saved):
            meter.forward_only, meter.input_grad, meter.trained = forward_only, input_grad, trained
        for meter in self.meters[len(saved):]:
            meter.forward_only = meter.input_grad = meter.trained = 0
        self.steps = dict(state["steps"])

    # ------------------------------------------------------------------ totals
    def samples(self, role: str) -> int:
        return sum(m.samples for m in self.meters if m.role == role)

    def totals(self) -> dict[str, float]:
        """``student_images``, ``generator_steps``, ``train_flops`` and the per-role breakdown."""
        out: dict[str, float] = {
            "student_images": float(self.samples("student")),
            "generator_steps": float(self.steps.get("generator", 0)),
            "train_flops": float(sum(m.flops for m in self.meters)),
        }
        for role in dict.fromkeys(m.role for m in self.meters):
            out[f"flops/{role}"] = float(sum(m.flops for m in self.meters if m.role == role))
            out[f"samples/{role}"] = float(self.samples(role))
        for role, n in self.steps.items():
            out[f"steps/{role}"] = float(n)
        return out
