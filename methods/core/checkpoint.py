"""Resumable runs: one checkpoint file per run, written at each evaluation and stage boundary (spec §1.5, §6 "Sizing").

Methods declare what must survive an interruption and loop over the harness's iteration counter;
they contain no save or load code:

- ``ctx.keep(name=obj, ...)``: networks, optimizers, schedulers, ``torch.Generator`` s and any object
  with ``state_dict``/``load_state_dict`` (e.g. :class:`Tally`, the pools, the samplers).  When a
  checkpoint is being resumed, the saved state is loaded into ``obj`` at once.
- ``for it in ctx.steps(n, stage)``: ``1..n``; after a resume it starts after the checkpointed
  iteration (a finished stage yields nothing), and restores every random-number state and the
  context's own state (history, best-val state, accounting, loss sums, wall clock) just before
  the first resumed iteration, where the checkpoint was taken.
- ``ctx.once(name, fn)``: a stage-boundary product (e.g. HiDFD's synthetic set): computed once,
  written once to a file of its own next to the checkpoint (``<checkpoint>.once-<name>.pt``, tensors
  only, e.g. one uint8 array), and returned from that file on resume.  The checkpoint names the file
  and its sha256, so a later checkpoint (every evaluation) does not re-serialise a product that never
  changes, and a swapped or damaged product file is refused.

The checkpoint is written after the body of an iteration that evaluated (``ctx.end_iteration``),
every ``every`` iterations of a stage without evaluations, at every ``once`` boundary, and when a
time slice ends (``--stop-after``: the run then raises :class:`~methods.core.errors.SliceEnded`).
It is written atomically (temporary file in the same folder, fsync, ``os.replace``), holds only
tensors and plain containers (``torch.load(..., weights_only=True)``), and carries a fingerprint of
the run (method, resolved hyperparameters, seed, budget, dataset, teacher and student weights at
the start) so that a checkpoint of another run is refused instead of silently continued.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError, SliceEnded

FORMAT = 2  # 2: once products in files of their own; 1 (still read): inline
READABLE_FORMATS = (1, 2)


@dataclass(frozen=True)
class CheckpointConfig:
    """Where a run checkpoints, whether it may continue an existing file, and when its time slice ends.

    ``resume``: continue ``path`` if it exists (else an existing file is refused, nothing overwritten).
    ``deadline``: a ``time.time()`` value; at the first iteration that ends after it the run writes
    its checkpoint and raises :class:`SliceEnded`.
    """

    path: Path
    resume: bool = False
    deadline: float | None = None


class Tally(dict):
    """Plain numbers a method accumulates across iterations (e.g. stage wall times), as resumable state."""

    def state_dict(self) -> dict[str, Any]:
        return dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clear()
        self.update(state)


# ----------------------------------------------------------------------------- random-number states
def rng_state() -> dict[str, Any]:
    """Python ``random``, NumPy, torch CPU and every CUDA device's generator, as tensors and plain values."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    import numpy as np

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- object states
def _state_of(obj: Any) -> Any:
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    return obj.state_dict()


def _cpu(value: Any) -> Any:
    """A copy of ``value`` with every tensor on the CPU (containers rebuilt; other values as they are)."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):  # a shallow copy keeps the type (e.g. a scheduler's Counter of milestones)
        out = copy.copy(value)
        for k, v in value.items():
            out[k] = _cpu(v)
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def _load_into(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    elif isinstance(obj, nn.Module):
        obj.load_state_dict(state)
    elif isinstance(obj, torch.optim.Optimizer):
        obj.load_state_dict(state)  # moves the state to the parameters' device
    else:
        obj.load_state_dict(state)


def _check_keepable(name: str, obj: Any) -> None:
    if isinstance(obj, torch.Generator):
        return
    if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
        raise TypeError(f"ctx.keep({name}=...): {type(obj).__name__} has no state_dict/load_state_dict")


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's state (names, shapes, dtypes and values): which teacher / student a run started from."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def fingerprint(**fields: Any) -> dict[str, str]:
    """The run's identity as strings (JSON for structured values), compared key by key on resume."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for k, v in fields.items()}


# ----------------------------------------------------------------------------- reading and writing
def write_atomic(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file in ``path``'s folder, fsync, then ``os.replace`` (never a half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover  (some filesystems refuse fsync on a folder)
        pass


REQUIRED = ("format", "fingerprint", "position", "stages", "kept", "once", "context", "rng")
ONCE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def once_path(checkpoint: Path, name: str) -> Path:
    """The file holding the ``once`` product ``name`` of the run checkpointed at ``checkpoint``."""
    return checkpoint.with_name(f"{checkpoint.name}.once-{name}.pt")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_file(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; an unreadable file raises :class:`CheckpointError` (one line)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (truncated zip, garbage bytes, unpickling refusal...)
        raise CheckpointError(f"{what} {path} is unreadable (truncated or corrupt: {type(error).__name__}); "
                              "delete it to start this run afresh") from None


def read(path: Path, expected: dict[str, str]) -> dict[str, Any]:
    """Load and check a checkpoint; a corrupt, truncated or foreign file raises :class:`CheckpointError` (one line)."""
    payload = read_file(path)
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED) or payload["format"] not in READABLE_FORMATS:
        raise CheckpointError(f"checkpoint {path} is not a dfkd-bench checkpoint of format {FORMAT}; "
                              "delete it to start this run afresh")
    saved = payload["fingerprint"]
    differ = [k for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k)]
    if differ:
        key = differ[0]
        raise CheckpointError(
            f"checkpoint {path} belongs to another run ({key} {_short(saved.get(key))} there, {_short(expected.get(key))} "
            f"here{'; also ' + ', '.join(differ[1:]) if differ[1:] else ''}); delete it to start this run afresh")
    return payload


def _short(value: str | None) -> str:
    if value is None:
        return "missing"
    return value if len(value) <= 40 else value[:37] + "..."


# ----------------------------------------------------------------------------- the run's checkpointer
class Checkpointer:
    """The checkpoint of one run: what is kept, where the run stands, when the file is written.

    ``save_context``/``load_context`` are the context's own state (supplied by
    :class:`~methods.core.context.DistillContext`).  ``pending`` is the checkpoint being resumed,
    until the run reaches the point where it was written.
    """

    def __init__(self, config: CheckpointConfig, expected: dict[str, str],
                 save_context: Callable[[], dict[str, Any]], load_context: Callable[[dict[str, Any]], None]) -> None:
        self.config = config
        self.path = Path(config.path)
        self.fingerprint = expected
        self._save_context = save_context
        self._load_context = load_context
        self.kept: dict[str, Any] = {}
        self.once_values: dict[str, Any] = {}
        self.stages: dict[str, int] = {}
        self.pending: dict[str, Any] | None = None
        self.resumed_from: dict[str, Any] | None = None  # the position a resume started from (for reports)
        self.request = False  # an evaluation asked for a checkpoint after this iteration's body
        if self.path.exists():
            if not config.resume:
                raise CheckpointError(f"checkpoint {self.path} exists; pass --resume to continue it, or delete it")
            self.pending = read(self.path, expected)
            self.stages = dict(self.pending["stages"])
            self.resumed_from = dict(self.pending["position"])

    # ------------------------------------------------------------------ declaring state
    def keep(self, objects: dict[str, Any]) -> None:
        for name, obj in objects.items():
            _check_keepable(name, obj)
            if name in self.kept and self.kept[name] is not obj:
                raise ValueError(f"ctx.keep: the name {name!r} is already kept for another object")
            self.kept[name] = obj
            if self.pending is not None and name in self.pending["kept"]:
                try:
                    _load_into(obj, self.pending["kept"][name])
                except (RuntimeError, KeyError, ValueError, TypeError) as error:
                    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
                    raise CheckpointError(f"checkpoint {self.path}: the saved {name!r} does not fit this run ({first}); "
                                          "delete it to start this run afresh") from None

    # ------------------------------------------------------------------ the iteration counter
    def steps(self, n: int, stage: str, every: int | None) -> Iterator[int]:
        done = self.stages.get(stage, 0)
        self._reached(("step", stage, done))
        if done >= n:
            self.stages[stage] = n
            return
        for it in range(done + 1, n + 1):
            yield it
            self.stages[stage] = it
            periodic = every is not None and (it % every == 0 or it == n)
            ended = self.config.deadline is not None and time.time() >= self.config.deadline
            if self.request or periodic or ended:
                self.request = False
                self.save(("step", stage, it))
            if ended:
                raise SliceEnded(f"time slice ended after {stage} iteration {it}/{n}; checkpoint {self.path}")

    def once(self, name: str, fn: Callable[[], Any]) -> Any:
        if not ONCE_NAME.match(name):
            raise ValueError(f"ctx.once: bad name {name!r}; allowed: 1-64 letters, digits, _ or -")
        if self.pending is not None and name in self.pending["once"]:
            if self.pending["format"] == 1:  # written before product files existed: the value is inline
                value = self.pending["once"][name]
                self.once_values[name] = self._write_once(name, value)
            else:
                value = self._read_once(name, self.pending["once"][name])
                self.once_values[name] = dict(self.pending["once"][name])
            self._reached(("once", name, 0))
            return value
        value = fn()
        self.once_values[name] = self._write_once(name, value)
        self.save(("once", name, 0))
        return value

    def _write_once(self, name: str, value: Any) -> dict[str, str]:
        path = once_path(self.path, name)
        write_atomic(path, {"format": FORMAT, "fingerprint": self.fingerprint, "name": name, "value": _cpu(value)})
        return {"file": path.name, "sha256": file_sha256(path)}

    def _read_once(self, name: str, entry: dict[str, str]) -> Any:
        """The ``once`` product ``name`` from its own file, checked against the checkpoint's sha256."""
        path = self.path.with_name(str(entry.get("file", "")))
        if path.parent != self.path.parent or not path.is_file():
            raise CheckpointError(f"checkpoint {self.path}: its {name!r} file {path.name} is missing; "
                                  "delete the checkpoint to start this run afresh")
        if file_sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {self.path}: its {name!r} file {path.name} was changed since the "
                                  "checkpoint was written (sha256 differs); delete both to start this run afresh")
        payload = read_file(path, "product file")
        if payload.get("name") != name or payload.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"checkpoint {self.path}: its {name!r} file {path.name} belongs to another run; "
                                  "delete both to start this run afresh")
        return payload["value"]

    # ------------------------------------------------------------------ resume point and writing
    def _reached(self, position: tuple[str, str, int]) -> None:
        """The run stands where the pending checkpoint was written: restore RNG and context state there."""
        if self.pending is None:
            return
        saved = self.pending["position"]
        if (saved["kind"], saved["name"], saved["iteration"]) != position:
            return
        missing = [k for k in self.pending["kept"] if k not in self.kept]
        if missing:
            raise CheckpointError(f"checkpoint {self.path} holds state this run never declared ({', '.join(missing)}); "
                                  "delete it to start this run afresh")
        self._load_context(self.pending["context"])
        set_rng_state(self.pending["rng"])
        self.pending = None

    def save(self, position: tuple[str, str, int]) -> None:
        kind, name, iteration = position
        payload = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "position": {"kind": kind, "name": name, "iteration": iteration},
            "stages": dict(self.stages),
            "kept": {k: _cpu(_state_of(obj)) for k, obj in self.kept.items()},
            "once": self.once_values,
            "context": _cpu(self._save_context()),
            "rng": rng_state(),
        }
        write_atomic(self.path, payload)

    def check_consumed(self) -> None:
        """After the method ran: a checkpoint whose position was never reached does not belong to this code."""
        if self.pending is not None:
            pos = self.pending["position"]
            raise CheckpointError(f"checkpoint {self.path} stops at {pos['kind']} {pos['name']!r} {pos['iteration']}, "
                                  "which this run never reached; delete it to start this run afresh")

    def remove(self) -> None:
        """Drop the checkpoint of a finished run and its ``once`` product files."""
        for entry in self.once_values.values():
            self.path.with_name(entry["file"]).unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
