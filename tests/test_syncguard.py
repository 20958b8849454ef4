"""The host-sync guard (methods/core/syncguard.py): iteration bodies under sync-debug "error", harness steps not.

On CPU no tensor synchronises, so these tests check the switching itself: ``set_mode`` (the one call
into CUDA) is replaced by a recorder, and the student's forward passes note the mode they ran under.
"""
from __future__ import annotations

import pytest
import torch

from benchmark import zoo
from methods import Budget, distill
from methods.core import syncguard
from methods.core.syncguard import SyncGuard

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def modes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every mode the guard sets, in order; ``modes[-1]`` is the current one."""
    calls = ["default"]
    monkeypatch.setattr(syncguard, "set_mode", calls.append)
    return calls


def test_loop_switches_to_error_for_each_body_and_back_between_and_after(modes) -> None:
    guard = SyncGuard(True)
    seen = []
    for it in guard.loop(range(1, 4)):
        seen.append((it, modes[-1]))
        if it == 2:
            with guard.allowed():
                seen.append(("validation", modes[-1]))
            seen.append(("after validation", modes[-1]))
    assert seen == [(1, "error"), (2, "error"), ("validation", "default"), ("after validation", "error"),
                    (3, "error")]
    assert modes[-1] == "default"


def test_a_disabled_guard_never_touches_cuda(modes) -> None:
    guard = SyncGuard(False)
    assert list(guard.loop(range(1, 3))) == [1, 2]
    with guard.allowed():
        pass
    guard.close()
    assert modes == ["default"]


def test_distill_runs_training_steps_under_error_and_validation_under_default(modes, mnist,
                                                                             lenet5_teacher) -> None:
    torch.manual_seed(0)
    student = zoo.build("lenet5-half", 10, 1)
    forwards: list[tuple[bool, str]] = []  # (training, mode)
    student.register_forward_pre_hook(lambda module, args: forwards.append((module.training, modes[-1])))
    distill(lenet5_teacher, student, Budget(), method="dfad", data=mnist, profile="quick", seed=0, device="cpu",
            overrides={"iterations": 4, "eval_every": 2, "batch_size": 8, "ngf": 4}, sync_debug=True)
    training = {mode for is_training, mode in forwards if is_training}
    evaluation = {mode for is_training, mode in forwards if not is_training}
    assert training == {"error"}  # every S and G step of DFAD
    assert evaluation == {"default"}  # validation at 2 and 4, test accuracy after the run
    assert modes[-1] == "default"


def test_a_body_that_raises_leaves_the_mode_at_default(modes, mnist, lenet5_teacher, monkeypatch) -> None:
    student = zoo.build("lenet5-half", 10, 1)

    def broken(*args, **kwargs):
        raise RuntimeError("synchronizing operation")  # what CUDA raises in "error" mode

    student.register_forward_pre_hook(lambda module, args: broken() if module.training else None)
    with pytest.raises(RuntimeError, match="synchronizing"):
        distill(lenet5_teacher, student, Budget(), method="dfad", data=mnist, profile="quick", seed=0, device="cpu",
                overrides={"iterations": 2, "eval_every": 1, "batch_size": 8, "ngf": 4}, sync_debug=True)
    assert modes[-1] == "default"
