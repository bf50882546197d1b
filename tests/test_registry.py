"""Registry by name, clear errors, and convert_norms on real models."""

import pytest
import torch
import torchvision
from torch import nn

import exoticnorm as en
from exoticnorm.registry import _REGISTRY

EXPECTED = {"bn", "none", "bn-mean", "bn-var", "bn-frozen", "ln", "in", "gn", "running-bn"}


def test_every_issue_norm_is_registered_and_builds():
    assert EXPECTED <= set(en.available_norms())
    x = torch.randn(8, 6, 4, 4)
    for name in en.available_norms():
        m = en.create_norm(name, 6)
        assert m(x).shape == x.shape, name
        assert en.describe_norms()[name], f"{name} has no description"


def test_unknown_name_lists_valid_ones():
    with pytest.raises(en.NormConfigError, match="unknown norm 'batchnorm'.*Registered norms: bn, "):
        en.create_norm("batchnorm", 4)
    with pytest.raises(en.NormConfigError, match="Did you mean 'gn'"):
        en.create_norm("gnn", 4)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(en.NormConfigError, match="no option 'groups'. Did you mean 'num_groups'.*Its options: num_groups, eps, affine"):
        en.create_norm("gn", 4, groups=2)


def test_register_custom_norm_and_duplicate_guard():
    @en.register_norm("test-scale")
    class Scale(en.Norm):
        """Multiply by two."""

        def _normalize(self, x):
            return 2 * x

    try:
        assert en.describe_norms()["test-scale"] == "Multiply by two."
        torch.testing.assert_close(en.create_norm("test-scale", 3)(torch.ones(2, 3)), torch.full((2, 3), 2.0))
        with pytest.raises(en.NormConfigError, match="already registered"):
            en.register_norm("test-scale")(lambda c: nn.Identity())
    finally:
        _REGISTRY.pop("test-scale")


def test_convert_resnet18_keeps_device_dtype_mode_and_affine():
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    with torch.no_grad():
        model.bn1.weight.fill_(0.7)
        model.bn1.running_mean.fill_(0.3)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = model(x)
    n_bn = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    out = en.convert_norms(model, "bn")
    assert out is model
    ours = [m for m in model.modules() if type(m) is en.BatchNorm]
    assert len(ours) == n_bn and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(not m.training and m.weight.dtype == torch.float64 for m in ours)
    assert model.bn1.weight[0].item() == 0.7 and model.bn1.running_mean[0].item() == 0.3
    torch.testing.assert_close(model(x), expected)  # same state, same function


def test_convert_to_other_norm_copies_affine_only_where_meaningful():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        model[1].weight.fill_(2.0)
        model[1].running_mean.fill_(5.0)
    model = en.convert_norms(model, "gn", num_groups=2)
    assert type(model[1]) is en.GroupNorm and model[1].num_groups == 2
    assert torch.equal(model[1].weight, torch.full((4,), 2.0))
    frozen = en.convert_norms(nn.BatchNorm1d(3), "bn-frozen")
    assert type(frozen) is en.FrozenAffineBatchNorm and list(frozen.parameters()) == []
    back = en.convert_norms(en.convert_norms(nn.BatchNorm1d(3), "ln"), "bn")
    assert type(back) is en.BatchNorm


def test_convert_root_norm_and_exact_types():
    class MyBN(nn.BatchNorm2d):
        pass

    root = en.convert_norms(nn.BatchNorm2d(3).train(False), "ln")
    assert type(root) is en.LayerNorm and not root.training
    model = nn.Sequential(MyBN(3), nn.BatchNorm2d(3))
    en.convert_norms(model, "none")
    assert type(model[0]) is MyBN and type(model[1]) is en.NoNorm


def test_convert_errors_before_changing_anything():
    model = nn.Sequential(nn.BatchNorm1d(3))
    with pytest.raises(en.NormConfigError, match="unknown norm"):
        en.convert_norms(model, "zzz")
    with pytest.raises(en.NormConfigError, match="no option 'bogus'"):
        en.convert_norms(model, "bn", bogus=1)
    assert type(model[0]) is nn.BatchNorm1d


def test_convert_carries_the_source_options():
    src = nn.BatchNorm2d(4, eps=1e-3, momentum=0.3, affine=False, track_running_stats=False)
    out = en.convert_norms(src, "bn")
    assert (out.eps, out.momentum, out.affine, out.track_running_stats) == (1e-3, 0.3, False, False)
    assert en.convert_norms(nn.BatchNorm2d(4, eps=1e-3), "bn", eps=1e-2).eps == 1e-2  # kwargs win
    assert en.convert_norms(nn.BatchNorm2d(4, eps=1e-3), "gn").eps == 1e-3
