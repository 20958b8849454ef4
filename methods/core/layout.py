"""Memory layout of the networks a run forwards: channels-last on CPU, PyTorch's default elsewhere.

On this project's CPUs (oneDNN convolutions, fp32) channels-last weights make the backward pass to
the *input* about twice as fast (a frozen LeNet-5(-BN) teacher or student back-propagating to a
generator's images) and GeneratorA's forward + backward about 1.5x; a trainable student's step is
unchanged.  Those passes are what every generator and inversion method spends its time in, so the
harness resolves the layout once per run (``DistillContext.memory_format``) and puts every network
it forwards (teacher, student and each module a method declares with ``ctx.track``) in it.  Values are the same function up to float rounding; the parameters
stay the same ``Parameter`` objects (optimizers built before the move keep working).

``DFKD_MEMORY_FORMAT=channels_last|contiguous`` overrides the default (e.g. to compare the two in one
``python -m benchmark.speed ... --compare "base,env.DFKD_MEMORY_FORMAT=contiguous"`` run).  On CUDA the
default stays PyTorch's (contiguous) until measured there.
"""
from __future__ import annotations

import os

import torch

from .errors import DfkdError

ENV = "DFKD_MEMORY_FORMAT"
FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout for networks on ``device``: ``$DFKD_MEMORY_FORMAT`` if set, else channels-last on CPU."""
    value = os.environ.get(ENV)
    if value is None or value == "":
        return torch.channels_last if device.type == "cpu" else torch.contiguous_format
    if value not in FORMATS:
        raise DfkdError(f"bad {ENV}={value!r}; allowed: {', '.join(FORMATS)}")
    return FORMATS[value]

