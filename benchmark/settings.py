"""Where things live: results folder, data root, device (CLI options, then environment, then defaults)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from methods.core.api import resolve_device


@dataclass(frozen=True)
class Settings:
    """Global options shared by every command."""

    results: Path
    data_dir: Path
    device: str

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


def absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute against the current directory, now (``~`` expanded; links kept)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def make_settings(results: str | None, data_dir: str | None, device: str | None) -> Settings:
    """``--results`` / ``DFKD_RESULTS`` / ``./results``; ``--data-dir`` / ``DFKD_DATA`` / ``./data``; ``--device`` / ``auto``.

    Relative paths are resolved once, here, against the directory the command was started in, so a
    later change of directory (a worker process, a test) cannot make them point elsewhere.
    """
    return Settings(
        results=absolute(results or os.environ.get("DFKD_RESULTS") or "results"),
        data_dir=absolute(data_dir or os.environ.get("DFKD_DATA") or "data"),
        device=device or "auto",
    )
