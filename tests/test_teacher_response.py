"""The teacher's noise response (benchmark.teacher_response): values by hand, the manifest, `teachers list`."""
from __future__ import annotations

import json
import math
import shutil

import torch
from click.testing import CliRunner
from torch import nn

from benchmark.cli import main
from benchmark.teacher_response import NOISE_SEED, noise_response
from benchmark.teachers import load_teacher, read_manifest, teacher_dir
from methods.core.images import ImageSet


class Linear1x2x2(nn.Module):
    """A 3-class 'teacher' on 1×2×2 images: z = W·flatten(x), with a BN-free, known map."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_values_match_a_hand_computation():
    weight = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, -3.0]])
    model = Linear1x2x2(weight)
    pixels = torch.tensor([[[[255, 0], [0, 0]]], [[[0, 255], [0, 255]]]], dtype=torch.uint8)
    real = ImageSet(pixels, torch.tensor([0, 1]), 2, (0.5,), (0.5,))
    got = noise_response(model, real, num_classes=3, samples=4)

    x_real = (pixels.float() / 255 - 0.5) / 0.5  # the two images, normalized
    z_real = x_real.flatten(1) @ weight.t()
    noise = torch.randn((4, 1, 2, 2), generator=torch.Generator().manual_seed(NOISE_SEED))
    z_noise = noise.flatten(1) @ weight.t()
    assert math.isclose(got["real_logit_abs"], z_real.abs().mean().item(), rel_tol=1e-6)
    assert math.isclose(got["noise_logit_abs"], z_noise.abs().mean().item(), rel_tol=1e-6)
    assert math.isclose(got["noise_to_real"], got["noise_logit_abs"] / got["real_logit_abs"], rel_tol=1e-6)
    counts = torch.bincount(z_noise.argmax(1), minlength=3).float()
    freq = counts[counts > 0] / 4
    assert math.isclose(got["noise_class_coverage"], (-(freq * freq.log()).sum() / math.log(3)).item(), abs_tol=1e-6)
    # the same seed gives the same noise: the diagnostic is reproducible
    assert noise_response(model, real, num_classes=3, samples=4) == got


def test_one_class_on_noise_has_zero_coverage():
    model = Linear1x2x2(torch.tensor([[0.0] * 4, [0.0] * 4, [0.0] * 4]))
    with torch.no_grad():
        model.fc.weight[0] = 0.0  # all logits 0: argmax is class 0 for every input
    real = ImageSet(torch.zeros((3, 1, 2, 2), dtype=torch.uint8), torch.zeros(3, dtype=torch.long), 2, (0.5,), (0.5,))
    got = noise_response(model, real, num_classes=3, samples=8)
    assert got["noise_class_coverage"] == 0.0 and got["noise_logit_abs"] == 0.0


def test_trained_teachers_record_it_and_list_shows_it(results_dir, mnist, data_root, tmp_path):
    for arch in ("lenet5", "lenet5-bn"):
        manifest = read_manifest(results_dir, "mnist", arch)
        model, _ = load_teacher(results_dir, "mnist", arch)
        # recorded at training time on validation images: the loaded weights give the same numbers
        again = noise_response(model, mnist.val, mnist.num_classes)
        for key, value in manifest["noise_response"].items():
            assert math.isclose(value, again[key], rel_tol=1e-5, abs_tol=1e-6), (arch, key)
        assert manifest["noise_response"]["real_logit_abs"] > 1.0  # a trained teacher is confident on digits

    results = tmp_path / "results"
    shutil.copytree(results_dir, results)
    # a teacher cached before the diagnostic existed: listed with dashes, not an error
    path = teacher_dir(results, "mnist", "lenet5") / "manifest.json"
    old = json.loads(path.read_text())
    del old["noise_response"]
    path.write_text(json.dumps(old))
    out = CliRunner().invoke(main, ["teachers", "list"], env={"DFKD_RESULTS": str(results), "DFKD_DATA": str(data_root)})
    assert out.exit_code == 0, out.output
    rows = {line.split()[1]: line for line in out.output.splitlines() if line.startswith("mnist")}
    bn = read_manifest(results, "mnist", "lenet5-bn")["noise_response"]
    assert f"({bn['noise_to_real']:.2f})" in rows["lenet5-bn"]
    assert "(" not in rows["lenet5"] and " - " in rows["lenet5"] + " "
    assert "|z| noise/real" in out.output
