"""The d2l LeNet and its exercise options."""

import pytest
import torch
from torch import nn

import exoticnorm as en
from exoticnorm.models import LeNet


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def test_default_is_d2l_bn_lenet():
    model = LeNet()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert [l.out_features for l in linears] == [120, 84, 10]
    assert [m.num_features for m in model.norms().values()] == [6, 16, 120, 84]
    assert _count(model, nn.Sigmoid) == 4 and _count(model, nn.AvgPool2d) == 2
    names = [n for n, _ in model.net.named_children()]
    assert names.index("norm_conv1") == names.index("conv1") + 1  # norm before activation
    assert names.index("act_conv1") == names.index("norm_conv1") + 1
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("layers,sites", [
    ("all", ["conv1", "conv2", "fc1", "fc2"]), ("conv", ["conv1", "conv2"]), ("fc", ["fc1", "fc2"]),
    ("first", ["conv1"]), ("last", ["fc2"]), ("none", []), (["conv2", "fc1"], ["conv2", "fc1"]),
])
def test_norm_placement(layers, sites):
    model = LeNet(norm_layers=layers)
    assert list(model.norms()) == sites
    assert _count(model, en.BatchNorm) == len(sites)


def test_bias_off_only_where_a_norm_follows():
    model = LeNet(norm_layers="conv", bias=False)
    assert model.net.conv1.bias is None and model.net.conv2.bias is None
    assert model.net.fc1.bias is not None and model.net.fc3.bias is not None
    n_with = sum(p.numel() for p in LeNet(bias=True).parameters())
    n_without = sum(p.numel() for p in LeNet(bias=False).parameters())
    assert n_with - n_without == 6 + 16 + 120 + 84


def test_dropout_options_and_activation():
    model = LeNet(norm_layers="conv", dropout=0.5, activation="relu")
    assert _count(model, nn.Dropout) == 2 and _count(model, nn.ReLU) == 4
    assert _count(LeNet(), nn.Dropout) == 0


def test_norm_kwargs_reach_the_norm():
    model = LeNet(norm="gn", norm_kwargs={"num_groups": 2, "eps": 1e-3})
    assert all(m.num_groups == 2 and m.eps == 1e-3 for m in model.norms().values())


def test_bad_options():
    with pytest.raises(ValueError, match="unknown norm_layers 'middle'"):
        LeNet(norm_layers="middle")
    with pytest.raises(ValueError, match="unknown norm sites"):
        LeNet(norm_layers=["conv3"])
    with pytest.raises(ValueError, match="unknown activation"):
        LeNet(activation="swish2")
    with pytest.raises(en.NormConfigError, match="unknown norm"):
        LeNet(norm="nope")
