"""Network modes for a block of code (spec §1.6: who is in train() or eval() when)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """``eval()`` on every module inside the block, each one's previous mode restored afterwards."""
    was = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, was, strict=True):
            module.train(mode)
