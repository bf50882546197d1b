"""The d2l/fastai variants: lite BN, fixed affine, LN/IN/GN, RunningBatchNorm, none."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import exoticnorm as en


def test_bn_mean_only_centres_and_tracks_mean():
    m = en.BatchNormMean(4)
    x = torch.randn(32, 4, 3, 3, dtype=torch.float64) * 3 + 2
    y = m.double()(x)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(y, x - mean)
    torch.testing.assert_close(m.running_mean, 0.1 * mean.flatten())
    assert not hasattr(m, "running_var") or m.running_var is None
    m.eval()
    torch.testing.assert_close(m(x), x - m.running_mean.view(1, -1, 1, 1))


def test_bn_var_only_scales_and_tracks_var():
    m = en.BatchNormVar(4).double()
    x = torch.randn(32, 4, 5, dtype=torch.float64) * 3 + 2
    y = m(x)
    var = x.var(dim=(0, 2), keepdim=True, unbiased=False)
    torch.testing.assert_close(y, x / torch.sqrt(var + 1e-5))
    n = 32 * 5
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * var.flatten() * n / (n - 1))
    assert "running_mean" not in m.state_dict()


def test_bn_frozen_has_no_trainable_affine_and_equals_plain_normalization():
    m = en.FrozenAffineBatchNorm(5)
    assert list(m.parameters()) == []
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    x = torch.randn(16, 5, 4, 4)
    ref = nn.BatchNorm2d(5, affine=False)
    torch.testing.assert_close(m(x), ref(x))
    torch.testing.assert_close(m.running_var, ref.running_var)


@pytest.mark.parametrize("name,groups", [("gn", 2), ("gn", 3), ("ln", 1), ("in", 6)])
@pytest.mark.parametrize("shape", [(4, 6, 5), (3, 6, 4, 4), (2, 6, 2, 3, 3)])
def test_group_family_matches_torch_group_norm(name, groups, shape):
    kw = {"num_groups": groups} if name == "gn" else {}
    m = en.create_norm(name, 6, **kw).double()
    ref = nn.GroupNorm(groups, 6).double()
    with torch.no_grad():
        for mod in (m, ref):
            mod.weight.copy_(torch.linspace(0.5, 1.5, 6))
            mod.bias.copy_(torch.linspace(-1, 1, 6))
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y, y_ref = m(x), ref(x)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    g = torch.randn(shape, dtype=torch.float64)
    gx, gw = torch.autograd.grad(y, (x, m.weight), g)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, ref.weight), g)
    torch.testing.assert_close(gx, gx_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gw, gw_ref, atol=1e-10, rtol=1e-10)
    m.eval()
    torch.testing.assert_close(m(x), y)  # no running statistics: eval equals train


def test_ln_on_features_matches_torch_layer_norm():
    x = torch.randn(8, 120)
    torch.testing.assert_close(en.LayerNorm(120)(x), F.layer_norm(x, (120,)), atol=1e-5, rtol=1e-5)


def test_group_errors():
    with pytest.raises(ValueError, match=r"does not divide num_features=6; choose one of \[1, 2, 3, 6\]"):
        en.GroupNorm(6, num_groups=4)
    with pytest.raises(en.InputError, match="1 value per group"):
        en.InstanceNorm(6)(torch.randn(8, 6))


def _rbn_reference(batches, momentum, eps):
    """fastai's RunningBatchNorm recurrence in float64 numpy (debias included, as fastai has it)."""
    sums = sqrs = count = dbias = 0.0
    samples = 0
    outputs = []
    for x in batches:
        b = x.shape[0]
        axes = (0,) + tuple(range(2, x.ndim))
        m = 1 - (1 - momentum) / math.sqrt(max(b - 1, 1))
        sums = sums * (1 - m) + x.sum(axis=axes) * m
        sqrs = sqrs * (1 - m) + (x * x).sum(axis=axes) * m
        count = count * (1 - m) + (x.size / x.shape[1]) * m
        dbias = dbias * (1 - m) + m
        samples += b
        s, q, c = sums / dbias, sqrs / dbias, count / dbias
        mean = s / c
        var = q / c - mean**2
        if samples < 20:
            var = np.maximum(var, 0.01)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        outputs.append((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps))
    return outputs


@pytest.mark.parametrize("batch", [2, 4, 32])
def test_running_bn_matches_fastai_recurrence(batch):
    rng = np.random.default_rng(batch)
    batches = [rng.normal(1.0 + 0.1 * t, 2.0, (batch, 3, 4, 4)) for t in range(12)]
    m = en.RunningBatchNorm(3, momentum=0.1).double()
    ours = [m(torch.from_numpy(x)).detach().numpy() for x in batches]
    for a, r in zip(ours, _rbn_reference(batches, 0.1, 1e-5)):
        np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-9)
    m.eval()
    before = m.sums.clone()
    last = m(torch.from_numpy(batches[-1])).detach().numpy()
    np.testing.assert_allclose(last, ours[-1], rtol=1e-9, atol=1e-9)  # eval: same stats, not moved
    assert torch.equal(before, m.sums)


def test_running_bn_gradient_flows_through_the_current_batch():
    m = en.RunningBatchNorm(3).double()
    m(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: en.RunningBatchNorm(3).double()(t), (x,))
    assert m.training and m(torch.randn(2, 3)).shape == (2, 3)


def test_running_bn_eval_before_training_is_identity_like():
    m = en.RunningBatchNorm(3).eval()
    x = torch.randn(5, 3)
    torch.testing.assert_close(m(x), x / math.sqrt(1 + 1e-5))
    with pytest.raises(ValueError, match="float momentum"):
        en.RunningBatchNorm(3, momentum=None)


def test_none_is_identity_but_checks_channels():
    m = en.create_norm("none", 4)
    x = torch.randn(3, 4, 2)
    assert m(x) is x and list(m.parameters()) == []
    with pytest.raises(en.InputError, match="built for 4 channels"):
        m(torch.randn(3, 5))


def test_running_bn_keeps_precision_far_from_zero():
    """float32 input offset by 1e4: the centred sums keep the std (raw sums of squares gave
    an output std of 156)."""
    torch.manual_seed(0)
    m = en.create_norm("running-bn", 4)
    for _ in range(30):
        y = m(torch.randn(16, 4, 5) + 1e4)
    assert abs(y.std().item() - 1) < 0.1
    m.eval()
    assert abs(m(torch.randn(16, 4, 5) + 1e4).std().item() - 1) < 0.15


def test_running_bn_loads_version_1_state():
    """Version 1 held the raw sum of squares Q; loading converts it to R = Q − S²/c."""
    torch.manual_seed(0)
    m = en.create_norm("running-bn", 3)
    for _ in range(5):
        m(torch.randn(8, 3) * 2 + 1)
    state = m.state_dict()
    old = dict(state)
    old["sqrs"] = state["sqrs"] + state["sums"] ** 2 / state["count"]
    old = type(state)(old)
    old._metadata = {"": {"version": 1}}
    fresh = en.create_norm("running-bn", 3)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.sqrs, m.sqrs, rtol=1e-4, atol=1e-4)
