"""Datasets by name through torchvision, held as uint8 tensors; splits and collected subsets.

Spec §1.4: train-core = stratified 90% of the official training split (seed 0), val = the other
10% (true labels, harness only), test = the official test split.  Spec §2.9: MNIST-like images
are resized 28 → 32.  Spec §1.3 rule 4: normalization statistics per dataset.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from methods.core.api import TaskData
from methods.core.errors import DfkdError
from methods.core.images import Augment, ImageSet

VAL_FRACTION = 0.1
SPLIT_SEED = 0


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's shape and conventions: classes, channels, size, normalization, augmentation."""

    name: str
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_augment: Augment
    loader: Callable[[Path, bool, bool], tuple[Tensor, Tensor]]  # (root, train, download) -> (uint8 NCHW, labels)


def _torchvision(cls_name: str, split_kw: str | None = None) -> Callable[[Path, bool, bool], tuple[Tensor, Tensor]]:
    """Read a torchvision dataset's arrays directly (no per-sample transform)."""

    def load(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        kwargs = {"split": "train" if train else "test"} if split_kw == "split" else {"train": train}
        try:
            ds = cls(str(root), download=download, **kwargs)
        except RuntimeError as error:
            raise DfkdError(
                f"dataset {cls_name} not found under {root} ({error}); pass --download to fetch it, "
                f"or point --data-dir / DFKD_DATA at a folder that holds it"
            ) from None
        data = ds.data
        data = torch.as_tensor(np.asarray(data)) if not isinstance(data, Tensor) else data
        if data.ndim == 3:  # N, H, W (MNIST family)
            data = data[:, None]
        elif data.shape[-1] == 3:  # N, H, W, C (CIFAR)
            data = data.permute(0, 3, 1, 2)
        labels = getattr(ds, "targets", None)
        if labels is None:
            labels = ds.labels  # SVHN
        return data.contiguous().to(torch.uint8), torch.as_tensor(np.asarray(labels), dtype=torch.long)

    return load


def _image_folder(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    """``<data-dir>/imagefolder/{train,test}/<class>/*.png``, resized to 32×32 RGB once at load."""
    import torchvision.datasets as tvd
    import torchvision.transforms.functional as TF

    folder = root / "imagefolder" / ("train" if train else "test")
    if not folder.is_dir():
        raise DfkdError(f"image folder {folder} not found; create {folder}/<class>/<image> or set --data-dir")
    ds = tvd.ImageFolder(str(folder))
    images = [TF.pil_to_tensor(TF.resize(ds.loader(path).convert("RGB"), [32, 32])) for path, _ in ds.samples]
    return torch.stack(images), torch.as_tensor(ds.targets, dtype=torch.long)


MNIST_STATS = ((0.1307,), (0.3081,))
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", 10, 1, 32, *MNIST_STATS, Augment(), _torchvision("MNIST")),
    "fashion-mnist": DatasetSpec("fashion-mnist", 10, 1, 32, (0.2860,), (0.3530,), Augment(), _torchvision("FashionMNIST")),
    "cifar10": DatasetSpec(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), Augment(4, True), _torchvision("CIFAR10")
    ),
    "cifar100": DatasetSpec(
        "cifar100", 100, 3, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), Augment(4, True), _torchvision("CIFAR100")
    ),
    "svhn": DatasetSpec(
        "svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), Augment(4, False), _torchvision("SVHN", "split")
    ),
    # Custom data: statistics are the ImageNet ones unless the teacher's manifest says otherwise.
    "imagefolder": DatasetSpec(
        "imagefolder", 0, 3, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), Augment(4, True), _image_folder
    ),
}


def dataset_names() -> list[str]:
    return list(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DfkdError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    return DATASETS[name]


def default_data_root() -> Path:
    """``DFKD_DATA`` if set, else ``./data``, made absolute against the current directory."""
    return Path(os.path.abspath(os.environ.get("DFKD_DATA", "data")))


def stratified_split(labels: Tensor, fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """(train-core, val) indices: ``fraction`` of every class to val, chosen with ``seed`` (spec §1.4).

    Per-class counts use largest remainders so that val holds exactly round(N·fraction) images
    (MNIST: 54,000 / 6,000).
    """
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels).tolist()
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    exact = [len(idx) * fraction for idx in members]
    counts = [int(e) for e in exact]
    missing = int(round(len(labels) * fraction)) - sum(counts)
    for i in sorted(range(len(classes)), key=lambda i: exact[i] - counts[i], reverse=True)[:missing]:
        counts[i] += 1
    core, val = [], []
    for idx, k in zip(members, counts):
        idx = idx[torch.randperm(len(idx), generator=gen)]
        val.append(idx[:k])
        core.append(idx[k:])
    return torch.sort(torch.cat(core)).values, torch.sort(torch.cat(val)).values


def balanced_indices(labels: Tensor, n: int, seed: int, balanced: bool = True) -> Tensor:
    """``n`` indices drawn with ``seed``: class-balanced by default (spec §1.4).

    Every class gets ⌊n/C⌋; the remainder goes to a seeded random choice of distinct classes
    (classes short of images give their share to the others).  Unbalanced = uniform draw.
    """
    if n > len(labels):
        raise DfkdError(f"cannot draw {n} examples from a pool of {len(labels)}")
    gen = torch.Generator().manual_seed(seed)
    if not balanced:
        return torch.randperm(len(labels), generator=gen)[:n]
    classes = torch.unique(labels)
    per_class = {int(c): torch.nonzero(labels == c).flatten() for c in classes}
    per_class = {c: idx[torch.randperm(len(idx), generator=gen)] for c, idx in per_class.items()}
    order = [int(c) for c in classes[torch.randperm(len(classes), generator=gen)]]
    quota = {c: n // len(classes) for c in order}
    for c in order[: n % len(classes)]:
        quota[c] += 1
    # Redistribute the quota of classes with too few images, round-robin over the others.
    short = sum(max(0, quota[c] - len(per_class[c])) for c in order)
    for c in order:
        quota[c] = min(quota[c], len(per_class[c]))
    while short > 0:
        for c in order:
            if short and quota[c] < len(per_class[c]):
                quota[c] += 1
                short -= 1
    return torch.cat([per_class[c][: quota[c]] for c in order])


def source_key(task: str, source: str | None) -> str:
    """The pool a collected ``source`` names, as ``"<dataset>:<split>"`` (default: the task's train-core)."""
    key = source or f"{task}:train"
    return key if ":" in key else f"{key}:train"


def check_source(task: str, source: str | None) -> None:
    """Refuse a collected pool the task may not learn from (spec §1.4: val / test are harness only).

    Allowed: ``<task>:train`` (its train-core) and another dataset's ``train`` or ``test`` split
    (unseen data for this task).  The task's own test or validation split is refused.
    """
    key = source_key(task, source)
    dataset, split = key.split(":", 1)
    allowed = f"{task}:train, or <other dataset>:train / <other dataset>:test"
    if split not in ("train", "test", "val"):
        raise DfkdError(f"bad collected source {source!r}; allowed: {allowed}")
    get_spec(dataset)
    if dataset == task and split != "train":
        what = "test" if split == "test" else "validation"
        raise DfkdError(f"collected source {source!r} is this task's own {what} split, which only the harness "
                        f"may read (spec §1.4); allowed: {allowed}")
    if split == "val":
        raise DfkdError(f"bad collected source {source!r}: a validation split is never a pool; allowed: {allowed}")


class PoolCollector:
    """Draws collected subsets from named pools ``"<dataset>:train"`` (train-core of that dataset).

    Pools other than the task's own are loaded on demand at the task's size and normalization.
    """

    def __init__(self, task: str, own_pool: ImageSet, loader: Callable[[str], ImageSet]):
        self.task = task
        self.pools: dict[str, ImageSet] = {f"{task}:train": own_pool}
        self.loader = loader

    def _pool(self, source: str | None) -> ImageSet:
        check_source(self.task, source)
        key = source_key(self.task, source)
        if key not in self.pools:
            self.pools[key] = self.loader(key)
        return self.pools[key]

    def pool_size(self, source: str | None) -> int:
        return len(self._pool(source))

    def draw(self, n: int, seed: int, source: str | None, balanced: bool) -> ImageSet:
        """``n`` examples drawn with ``seed``, in a seeded random order (not grouped by class, which
        would tell a method which images share a label)."""
        pool = self._pool(source)
        assert pool.labels is not None
        index = balanced_indices(pool.labels.cpu(), n, seed, balanced)
        order = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed + 1))
        return pool.subset(index[order])


def load_arrays(name: str, root: Path, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    """uint8 images (N, C, H, W) and int64 labels of one official split."""
    spec = get_spec(name)
    return spec.loader(Path(root), train, download)


def load_task(
    name: str,
    root: Path | None = None,
    download: bool = False,
    device: torch.device | str = "cpu",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> TaskData:
    """Everything a distillation run needs of dataset ``name``, on ``device``.

    ``mean``/``std`` default to the dataset's statistics; pass the teacher's (from its manifest).
    """
    spec = get_spec(name)
    root = Path(root) if root is not None else default_data_root()
    mean = tuple(mean) if mean is not None else spec.mean
    std = tuple(std) if std is not None else spec.std
    pixels, labels = load_arrays(name, root, True, download)
    test_pixels, test_labels = load_arrays(name, root, False, download)
    num_classes = spec.num_classes or int(labels.max()) + 1
    core_idx, val_idx = stratified_split(labels)

    def image_set(p: Tensor, y: Tensor) -> ImageSet:
        return ImageSet(p.to(device), y.to(device), spec.size, mean, std)

    train = image_set(pixels[core_idx], labels[core_idx])
    val = image_set(pixels[val_idx], labels[val_idx])
    test = image_set(test_pixels, test_labels)

    def load_pool(key: str) -> ImageSet:
        dataset, split = key.split(":", 1)
        other = get_spec(dataset)
        if other.channels != spec.channels:
            raise DfkdError(
                f"collected source {key!r} has {other.channels} channel(s); the {name} teacher needs {spec.channels}"
            )
        p, y = load_arrays(dataset, root, split == "train", download)
        if split == "train":
            idx, _ = stratified_split(y)
            p, y = p[idx], y[idx]
        return image_set(p, y)

    return TaskData(
        dataset=name,
        num_classes=num_classes,
        channels=spec.channels,
        size=spec.size,
        mean=mean,
        std=std,
        train_augment=spec.train_augment,
        val=val,
        test=test,
        train=train,
        collector=PoolCollector(name, train, load_pool),
    )
