"""Teachers: trained by the tool with a documented recipe, cached under ``results/teachers``.

Spec §1.7.  MNIST-like: Adam 1e-3, B 256, 20 epochs, cosine decay per step [ours: the spec's
constant LR ended at 98.8% here; the decay makes the last epoch the converged one] (≈ 99.0%).  CIFAR-like:
SGD 0.1, momentum 0.9, wd 5e-4, B 128, 200 epochs cosine, RandomCrop(32, 4) + flip.  Teachers
train on train-core only; val selects nothing here but is reported.  The cache holds
``weights.pt`` (a state dict, loaded with ``weights_only=True``) and ``manifest.json`` with the
sha256 of the weights.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods.core.api import TaskData, seed_everything
from methods.core.checkpoint import file_sha256 as sha256_of  # one file hash for teachers and checkpoints
from methods.core.errors import DfkdError
from methods.core.images import Augment, accuracy

from . import zoo
from .data import get_spec
from .teacher_response import noise_response


@dataclass(frozen=True)
class TeacherRecipe:
    """How a teacher is trained (spec §1.7)."""

    optimizer: str  # "adam" | "sgd"
    lr: float
    batch_size: int
    epochs: int
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "none"  # "none" | "cosine"
    crop_padding: int = 0
    flip: bool = False


def default_recipe(dataset: str) -> TeacherRecipe:
    """The spec §1.7 recipe for ``dataset``."""
    spec = get_spec(dataset)
    if spec.channels == 1:
        return TeacherRecipe("adam", 1e-3, 256, 20, schedule="cosine")
    aug = spec.train_augment
    return TeacherRecipe("sgd", 0.1, 128, 200, 0.9, 5e-4, "cosine", aug.crop_padding, aug.flip)


def teacher_dir(results: Path, dataset: str, arch: str) -> Path:
    return Path(results) / "teachers" / dataset / arch


def train_teacher(
    model: nn.Module,
    data: TaskData,
    recipe: TeacherRecipe,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` with cross-entropy on labelled train-core; returns val/test accuracy.

    Batches come from tensors on the device; the only host syncs are one per epoch.
    """
    seed_everything(seed)
    assert data.train is not None
    train = data.train.to(device)
    model = model.to(device).train()
    steps_per_epoch = -(-len(train) // recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    if recipe.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=False
        )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if recipe.schedule == "cosine" else None
    augment = Augment(recipe.crop_padding, recipe.flip)
    sampler = train.sampler(recipe.batch_size)
    assert train.labels is not None
    val = data.val.to(device)
    for epoch in range(1, recipe.epochs + 1):
        loss_sum = torch.zeros((), device=device)
        for _ in range(steps_per_epoch):
            idx = sampler.next()
            loss = nn.functional.cross_entropy(model(train.batch(idx, augment)), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            loss_sum += loss.detach()
        if on_epoch is not None:
            on_epoch(epoch, {"loss": (loss_sum / steps_per_epoch).item(), "val_accuracy": accuracy(model, val)})
    model.eval()
    return {"val_accuracy": accuracy(model, val), "test_accuracy": accuracy(model, data.test.to(device))}


def save_teacher(
    results: Path,
    dataset: str,
    arch: str,
    model: nn.Module,
    data: TaskData,
    recipe: TeacherRecipe,
    seed: int,
    scores: dict[str, float],
    train_seconds: float,
    device: str,
) -> dict[str, Any]:
    """Write weights and manifest; an existing teacher is moved aside (``replaced-<time>``), never lost."""
    folder = teacher_dir(results, dataset, arch)
    if folder.exists():
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        shutil.move(str(folder), str(folder.parent / f"{arch}.replaced-{stamp}"))
    folder.mkdir(parents=True)
    weights = folder / "weights.pt"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
    manifest = {
        "dataset": dataset,
        "arch": arch,
        "num_classes": data.num_classes,
        "in_channels": data.channels,
        "size": data.size,
        "mean": list(data.mean),
        "std": list(data.std),
        "recipe": dataclasses.asdict(recipe),
        "seed": seed,
        "train_split": "train-core (90%, stratified, seed 0)",
        "val_accuracy": scores["val_accuracy"],
        "test_accuracy": scores["test_accuracy"],
        "noise_response": noise_response(model, data.val, data.num_classes),
        "train_seconds": train_seconds,
        "device": device,
        "torch": torch.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sha256": sha256_of(weights),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _train_command(dataset: str, arch: str, force: bool = False) -> str:
    return f"dfkd-bench teachers train --dataset {dataset} --arch {arch}" + (" --force" if force else "")


def read_manifest(results: Path, dataset: str, arch: str) -> dict[str, Any]:
    """The manifest of the cached teacher; a one-line error with the fixing command if absent."""
    path = teacher_dir(results, dataset, arch) / "manifest.json"
    if not path.is_file():
        raise DfkdError(
            f"no cached teacher for dataset {dataset!r}, arch {arch!r} under {Path(results) / 'teachers'}; "
            f"run: {_train_command(dataset, arch)}"
        )
    return json.loads(path.read_text())


def verified_manifest(results: Path, dataset: str, arch: str) -> dict[str, Any]:
    """The cached teacher's manifest after checking that ``weights.pt`` has the sha256 it records."""
    manifest = read_manifest(results, dataset, arch)
    weights = teacher_dir(results, dataset, arch) / "weights.pt"
    if not weights.is_file() or sha256_of(weights) != manifest["sha256"]:
        raise DfkdError(
            f"checksum mismatch for cached teacher {dataset}/{arch} ({weights}); "
            f"retrain with: {_train_command(dataset, arch, force=True)}"
        )
    return manifest


def load_teacher(results: Path, dataset: str, arch: str) -> tuple[nn.Module, dict[str, Any]]:
    """Build and load the cached teacher after checking its sha256 (``weights_only=True``)."""
    manifest = verified_manifest(results, dataset, arch)
    weights = teacher_dir(results, dataset, arch) / "weights.pt"
    model = zoo.build(arch, manifest["num_classes"], manifest["in_channels"])
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, AttributeError) as error:
        # weights_only=True refuses pickles that carry code; a wrong state dict fails load_state_dict.
        raise DfkdError(
            f"cached teacher {dataset}/{arch} ({weights}) is not a plain state dict of {arch} "
            f"(torch.load(weights_only=True) / load_state_dict: {type(error).__name__}); "
            f"retrain with: {_train_command(dataset, arch, force=True)}"
        ) from None
    return model.eval(), manifest


def list_teachers(results: Path) -> list[dict[str, Any]]:
    """Manifests of every cached teacher, sorted by (dataset, arch)."""
    root = Path(results) / "teachers"
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob("*/*/manifest.json")):
        if ".replaced-" in path.parent.name:
            continue
        manifest = json.loads(path.read_text())
        manifest["path"] = str(path.parent)
        found.append(manifest)
    return found


def timed_train(
    results: Path, dataset: str, arch: str, data: TaskData, recipe: TeacherRecipe, seed: int, device: torch.device,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Build, train, evaluate and cache a teacher; returns its manifest.

    The seed fixes the initial weights too: the model is built after seeding, not from whatever
    state earlier work in the process left the RNG in.
    """
    seed_everything(seed)
    model = zoo.build(arch, data.num_classes, data.channels)
    start = time.perf_counter()
    scores = train_teacher(model, data, recipe, seed, device, on_epoch)
    return save_teacher(results, dataset, arch, model, data, recipe, seed, scores, time.perf_counter() - start, str(device))
