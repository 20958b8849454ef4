"""Model zoo: the spec §2.1 parameter counts and the feature interface."""
from __future__ import annotations

import pytest
import torch

from benchmark import zoo
from methods import DfkdError

# spec §2.1 (C = 10): parameters
EXPECTED = {
    "lenet5": 61_706,
    "lenet5-half": 15_738,
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "wrn-16-1": 175_066,
    "wrn-16-2": 691_674,
    "wrn-40-1": 563_930,
    "wrn-40-2": 2_243_546,
    "vgg11-bn": 9_231_114,
}
VEC = {"lenet5": 120, "lenet5-half": 60, "resnet18": 512, "wrn-16-1": 64, "wrn-40-2": 128, "vgg11-bn": 512}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_parameter_counts_match_spec(arch):
    channels = 1 if arch.startswith("lenet") else 3
    assert zoo.count_parameters(zoo.build(arch, 10, channels)) == EXPECTED[arch]


@pytest.mark.parametrize("arch", list(VEC))
def test_features_are_consistent_with_forward(arch):
    channels = 1 if arch.startswith("lenet") else 3
    torch.manual_seed(0)
    net = zoo.build(arch, 10, channels).eval()
    x = torch.randn(2, channels, 32, 32)
    f = net.features(x)
    assert f.vec.shape == (2, VEC[arch])
    assert torch.allclose(f.logits, net(x), atol=1e-5)
    assert torch.allclose(net.head(f.vec), f.logits, atol=1e-5)
    assert len(f.stages) >= 2


def test_bn_layers_and_unknown_arch():
    assert zoo.build("lenet5", 10, 1).bn_layers() == []
    assert len(zoo.build("lenet5-bn", 10, 1).bn_layers()) == 3
    with pytest.raises(DfkdError, match="unknown arch 'resnet50'; allowed: lenet5"):
        zoo.build("resnet50", 10, 3)
