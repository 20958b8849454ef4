"""Deployed size and training compute (spec §1.2, §2.1 "What is deployed", §6 counting), hand-counted."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from benchmark import zoo
from benchmark.cli import main
from methods import Budget, distill
from methods.core.accounting import ACCOUNTING_KEYS, deployed_size
from methods.core.simkd import Projector, SharedHeadPredictor

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- hand counts (multiply-adds)
def conv_macs(out_hw: int, c_in: int, c_out: int, k: int) -> int:
    return out_hw * out_hw * c_out * c_in * k * k


def lenet_backbone_macs(c1: int, c2: int, c3: int) -> int:
    """conv5 1→c1 at 28², pool, conv5 c1→c2 at 10², pool, conv5 c2→c3 at 1² (32×32 input, spec §2.1)."""
    return conv_macs(28, 1, c1, 5) + conv_macs(10, c1, c2, 5) + conv_macs(1, c2, c3, 5)


HALF_MACS = lenet_backbone_macs(3, 8, 60) + 60 * 42 + 42 * 10  # 133,740
LENET5_MACS = lenet_backbone_macs(6, 16, 120) + 120 * 84 + 84 * 10  # 416,520 (spec: 0.42 MMAC)
HALF_PARAMS = (1 * 3 * 25 + 3) + (3 * 8 * 25 + 8) + (8 * 60 * 25 + 60) + (60 * 42 + 42) + (42 * 10 + 10)
HALF_HEAD_PARAMS = (60 * 42 + 42) + (42 * 10 + 10)
LENET5_HEAD_PARAMS = (120 * 84 + 84) + (84 * 10 + 10)
# SimKD projector 60 → 120 channels at 1×1 (spec §2.6): 1×1 60→60, 3×3 60→60, 1×1 60→120, BN affine
PROJECTOR_PARAMS = 60 * 60 + 60 * 60 * 9 + 60 * 120 + 2 * (60 + 60 + 120)
PROJECTOR_MACS = 60 * 60 + 60 * 60 * 9 + 60 * 120
SIMKD_PARAMS = HALF_PARAMS - HALF_HEAD_PARAMS + PROJECTOR_PARAMS + LENET5_HEAD_PARAMS
SIMKD_MACS = lenet_backbone_macs(3, 8, 60) + PROJECTOR_MACS + 120 * 84 + 84 * 10


def generator_a_macs(nz: int, ngf: int, nc: int = 1) -> int:
    """GeneratorA (spec §2.2), upsample then conv: Linear nz→2ngf·8², conv3 at 16² and 32² (×2), conv3 → nc."""
    return nz * 2 * ngf * 64 + conv_macs(16, 2 * ngf, 2 * ngf, 3) + conv_macs(32, 2 * ngf, ngf, 3) + conv_macs(32, ngf, nc, 3)


def test_hand_counts_match_the_spec_table():
    assert HALF_PARAMS == 15_738
    assert abs(LENET5_MACS - 0.42e6) < 0.01e6 and abs(HALF_MACS - 0.13e6) < 0.01e6  # spec §2.1 MMAC column
    assert SIMKD_PARAMS == 67_440


# ----------------------------------------------------------------------------- deployed predictors
def test_bare_student_size_is_lenet5_half():
    params, flops = deployed_size(zoo.build("lenet5-half", 10, 1), torch.zeros(2, 1, 32, 32))
    assert params == 15_738
    assert flops == pytest.approx(2 * HALF_MACS, rel=0.10)


def test_simkd_predictor_counts_backbone_projector_and_teacher_head_only():
    student, teacher = zoo.build("lenet5-half", 10, 1), zoo.build("lenet5", 10, 1)
    predictor = SharedHeadPredictor(student, Projector(60, 120), teacher.head, 1)
    params, flops = deployed_size(predictor, torch.zeros(2, 1, 32, 32))
    assert params == SIMKD_PARAMS  # the student's own (unused) classifier is not deployed
    assert flops == pytest.approx(2 * SIMKD_MACS, rel=0.10)


# ----------------------------------------------------------------------------- training compute
def test_dfad_training_flops_follow_the_spec_cost_formula(mnist, lenet5_teacher):
    """Spec §6: per iteration [k(G + T + 3S) + (3G + 2T + 2S)]·B; plus the 64-sample grid through G."""
    its, batch, k, nz, ngf = 2, 8, 5, 16, 4
    result = distill(lenet5_teacher, zoo.build("lenet5-half", 10, 1), Budget(iterations=its, batch_size=batch),
                     method="dfad", data=mnist, overrides={"nz": nz, "ngf": ngf, "eval_every": its,
                                                          "fused_upsample": False, "samples": 64}, device="cpu")
    a = result.accounting
    G, T, S = 2 * generator_a_macs(nz, ngf), 2 * LENET5_MACS, 2 * HALF_MACS
    expected = its * batch * (k * (G + T + 3 * S) + (3 * G + 2 * T + 2 * S)) + 64 * G
    assert a["train_flops"] == pytest.approx(expected, rel=0.10)
    assert a["teacher_images"] == its * (k + 1) * batch
    assert a["student_images"] == its * (k + 1) * batch
    assert a["generator_steps"] == its and a["steps/student"] == its * k
    assert a["student_parameters"] == 15_738
    assert a["teacher_parameters"] == 61_706
    assert a["teacher_flops"] == pytest.approx(T, rel=0.10)


def test_a_new_optimizer_is_not_counted_under_a_freed_ones_roles():
    """Steps count by the optimizer's own parameters: a student optimizer created where a freed generator
    optimizer lived (CPython reuses the address, so the same id()) must not count as a generator step."""
    from methods.core.accounting import Accountant

    acct = Accountant()
    gen, stu = nn.Linear(2, 2), nn.Linear(2, 2)
    acct.track("generator", gen)
    acct.track("student", stu)
    x = torch.zeros(1, 2)
    with acct.active():
        for _ in range(20):
            opt = torch.optim.SGD(gen.parameters(), lr=0.1)
            gen(x).sum().backward()
            opt.step()
            del opt
            opt = torch.optim.SGD(stu.parameters(), lr=0.1)
            stu(x).sum().backward()
            opt.step()
            del opt
    assert acct.steps == {"generator": 20, "student": 20}


def test_validation_forwards_are_not_training_compute(mnist, lenet5_teacher):
    """kd-collected: one teacher forward (F) and one trained student pass (3F) per sample, however often it validates."""
    runs = []
    for eval_every in (1, 4):
        runs.append(distill(lenet5_teacher, zoo.build("lenet5-half", 10, 1),
                            Budget(collected=20, iterations=4, batch_size=8), method="kd-collected", data=mnist,
                            overrides={"objective": "kd", "eval_every": eval_every}, device="cpu").accounting)
    for a in runs:
        assert a["student_images"] == 4 * 8
        assert a["train_flops"] == pytest.approx(4 * 8 * (2 * LENET5_MACS + 3 * 2 * HALF_MACS), rel=0.10)
    assert runs[0]["train_flops"] == runs[1]["train_flops"]


# ----------------------------------------------------------------------------- the CLI's JSON
def distill_json(results_dir, data_root, *args: str) -> dict:
    out = CliRunner().invoke(main, ["distill", "--dataset", "mnist", "--student", "lenet5-half", "--device", "cpu",
                                    "--results", str(results_dir), "--data-dir", str(data_root), "--json", *args])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout.strip().splitlines()[-1])


HIDFD_TINY = ("--set", "gan_iterations=2", "--set", "gan_batch_size=8", "--set", "n_synth=20",
              "--set", "ema_start=1", "--set", "gan_log_every=1")


@pytest.mark.parametrize(("method", "extra", "params"), [
    ("dfad", ("--set", "batch_size=8", "--set", "ngf=4"), 15_738),
    ("kd-collected", ("--collected", "100"), SIMKD_PARAMS),
    ("kd-collected", ("--collected", "100", "--set", "objective=kd"), 15_738),
    ("hidfd", ("--collected", "100", *HIDFD_TINY), SIMKD_PARAMS),
    ("hidfd", ("--collected", "100", "--set", "objective=kd", *HIDFD_TINY), 15_738),
])
def test_distill_json_reports_size_and_cost(results_dir, data_root, method, extra, params):
    out = distill_json(results_dir, data_root, "--method", method, "--teacher", "lenet5", "--iterations", "3", *extra)
    for key in ACCOUNTING_KEYS:
        assert key in out and out[key] == out[key], key
    assert out["student_parameters"] == params
    bare = params == 15_738
    assert out["student_flops"] == pytest.approx(2 * (HALF_MACS if bare else SIMKD_MACS), rel=0.10)
    assert out["teacher_parameters"] == 61_706
    assert out["teacher_flops"] == pytest.approx(2 * LENET5_MACS, rel=0.10)
    assert out["train_flops"] > 0 and out["student_images"] > 0
    assert (out["generator_steps"] > 0) == (method in ("dfad", "hidfd"))
    if method == "hidfd":
        assert out["generator_steps"] == 2 and out["steps/discriminator"] == 2
