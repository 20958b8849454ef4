"""Loss means kept on the device between reports: no host sync per step (spec §6 speed rules)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import NonFiniteLossError


class LossMeter:
    """Running sums of scalar tensors per name; :meth:`means` syncs once and checks every value."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self._sums)

    def state_dict(self) -> dict[str, dict]:
        """The running sums (tensors) and counts, for a checkpoint taken between evaluations."""
        return {"sums": dict(self._sums), "counts": dict(self._counts)}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        self._sums = {k: v.clone() for k, v in state["sums"].items()}
        self._counts = dict(state["counts"])

    def add(self, name: str, value: Tensor) -> None:
        """Accumulate ``value`` (detached, fp32, stays on its device)."""
        value = value.detach().float()
        if name in self._sums:
            if self._sums[name].device != value.device:  # restored from a (CPU) checkpoint
                self._sums[name] = self._sums[name].to(value.device)
            self._sums[name] += value
            self._counts[name] += 1
        else:
            self._sums[name] = value.clone()
            self._counts[name] = 1

    def means(self, where: str, extra: dict[str, Tensor] | None = None, what: str = "loss") -> dict[str, float]:
        """The mean of each name since the last call (plus ``extra`` values), in one host sync; then reset.

        Raises :class:`NonFiniteLossError`: "<what> '<key>' is nan <where>" (e.g. "at iteration 40").
        """
        extra = extra or {}
        keys = [*self._sums, *extra]
        tensors = [self._sums[k] / self._counts[k] for k in self._sums] + [v.detach().float() for v in extra.values()]
        values = torch.stack(tensors).tolist() if tensors else []
        self._sums.clear()
        self._counts.clear()
        out = dict(zip(keys, values, strict=True))
        for key, value in out.items():
            if not math.isfinite(value):
                raise NonFiniteLossError(f"{what} {key!r} is {value} {where}")
        return out
