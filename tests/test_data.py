"""Data: splits, collected subsets (determinism, class balance, labels withheld), normalization."""
from __future__ import annotations

import pytest
import torch

from benchmark.data import balanced_indices, get_spec, load_task, stratified_split
from methods import DfkdError
from methods.core.images import Augment, ImageSet, apply_augment, random_crop


def test_mnist_splits_match_spec(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (54_000, 6_000, 10_000)
    assert mnist.size == 32 and mnist.channels == 1 and mnist.num_classes == 10
    # val is stratified: every class holds 10% (±1) of its training images
    train_counts = torch.bincount(mnist.train.labels, minlength=10)
    val_counts = torch.bincount(mnist.val.labels, minlength=10)
    frac = val_counts.float() / (train_counts + val_counts).float()
    assert torch.all((frac - 0.1).abs() < 0.001)


def test_split_is_deterministic_and_disjoint():
    labels = torch.arange(1000) % 7
    a_core, a_val = stratified_split(labels)
    b_core, b_val = stratified_split(labels)
    assert torch.equal(a_core, b_core) and torch.equal(a_val, b_val)
    assert len(set(a_core.tolist()) & set(a_val.tolist())) == 0
    assert len(a_core) + len(a_val) == 1000 and len(a_val) == 100


def test_normalization_uses_teacher_statistics(mnist):
    x = mnist.test.normalized()
    assert x.shape == (10_000, 1, 32, 32)
    # MNIST statistics (0.1307, 0.3081) standardise the resized test set to ≈ N(0, 1) (resize shifts std a little)
    assert abs(x.mean().item()) < 0.02
    assert 0.85 < x.std().item() < 1.05
    pixels = mnist.test.to_pixels(slice(0, 4))
    assert torch.allclose(mnist.test.normalize(pixels), (pixels - 0.1307) / 0.3081)
    # background pixel 0 maps to -μ/σ
    assert x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


@pytest.mark.parametrize("n", [10, 100, 105, 7])
def test_collected_subset_is_balanced_and_deterministic(mnist, n):
    labels = mnist.train.labels
    first = balanced_indices(labels, n, seed=3)
    again = balanced_indices(labels, n, seed=3)
    other = balanced_indices(labels, n, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len(first) == n and len(set(first.tolist())) == n
    counts = torch.bincount(labels[first], minlength=10)
    assert counts.max() - counts.min() <= 1


def test_balanced_draw_redistributes_when_a_class_is_short():
    labels = torch.tensor([0] * 2 + [1] * 50 + [2] * 50)
    idx = balanced_indices(labels, 30, seed=0)
    counts = torch.bincount(labels[idx], minlength=3)
    assert counts.tolist()[0] == 2 and counts.sum() == 30 and abs(counts[1] - counts[2]) <= 1


def test_collector_withholds_nothing_itself_but_distill_strips_labels(mnist):
    drawn = mnist.collector.draw(20, seed=0, source=None, balanced=True)
    assert drawn.labels is not None  # the harness keeps labels to balance...
    assert drawn.without_labels().labels is None  # ...methods get them stripped (see test_api)
    with pytest.raises(DfkdError, match="cannot draw"):
        balanced_indices(mnist.train.labels, 60_000, seed=0)


def test_unknown_dataset_and_missing_files(tmp_path):
    with pytest.raises(DfkdError, match="unknown dataset 'mnis'; allowed: mnist"):
        get_spec("mnis")
    with pytest.raises(DfkdError, match=f"not found under {tmp_path}.*--download"):
        load_task("mnist", tmp_path)


def test_batched_crop_and_flip_keep_shape_and_content():
    x = torch.rand(16, 3, 32, 32)
    cropped = random_crop(x, 4)
    assert cropped.shape == x.shape
    # each crop is a shifted copy: its non-padded pixels are a sub-window of the original
    same = apply_augment(x, Augment())
    assert torch.equal(same, x)
    torch.manual_seed(0)
    flipped = apply_augment(x, Augment(flip=True))
    kept = [torch.equal(f, o) for f, o in zip(flipped, x)]
    mirrored = [torch.equal(f, o.flip(-1)) for f, o in zip(flipped, x)]
    assert all(k != m for k, m in zip(kept, mirrored))  # each image is either kept or mirrored, exactly
    assert 0 < sum(mirrored) < len(x)  # and both happen (p = 1/2 each, seeded)
    rrc = apply_augment(x, Augment(resized_crop_scale=(0.08, 1.0), flip=True))
    assert rrc.shape == x.shape and torch.isfinite(rrc).all()


def test_crop_offsets_are_per_image():
    x = torch.arange(32 * 32, dtype=torch.float).view(1, 1, 32, 32).repeat(64, 1, 1, 1) + 1
    out = random_crop(x, 2)
    assert len({tuple(o.flatten()[:40].tolist()) for o in out}) > 1


def test_imageset_sampler_covers_an_epoch():
    images = ImageSet(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), torch.arange(10), 32, (0.0,), (1.0,))
    sampler = images.sampler(4)
    seen = torch.cat([sampler.next() for _ in range(5)])  # 20 draws = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert images.batch(slice(0, 3)).shape == (3, 1, 32, 32)
