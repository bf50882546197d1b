"""exoticnorm.functional against torch's own kernels and float64 numpy references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import exoticnorm.functional as EF

SHAPES = [(8, 3), (6, 3, 7), (4, 3, 5, 6), (3, 3, 2, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_batch_norm_matches_torch_train_and_eval(shape, dtype, tol):
    x = (torch.randn(shape, dtype=dtype) * 3 + 1).requires_grad_()
    w = torch.rand(shape[1], dtype=dtype, requires_grad=True)
    b = torch.randn(shape[1], dtype=dtype, requires_grad=True)
    ours_rm, ours_rv = torch.randn(shape[1], dtype=dtype), torch.rand(shape[1], dtype=dtype) + 0.5
    ref_rm, ref_rv = ours_rm.clone(), ours_rv.clone()
    g = torch.randn(shape, dtype=dtype)
    for training in (True, False):
        y = EF.batch_norm(x, ours_rm, ours_rv, w, b, training, 0.3, 1e-5)
        grads = torch.autograd.grad(y, (x, w, b), g)
        y_ref = F.batch_norm(x, ref_rm, ref_rv, w, b, training, 0.3, 1e-5)
        grads_ref = torch.autograd.grad(y_ref, (x, w, b), g)
        torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
        for a, r in zip(grads, grads_ref):
            torch.testing.assert_close(a, r, atol=tol * 10, rtol=tol * 10)
        torch.testing.assert_close(ours_rm, ref_rm, atol=tol, rtol=tol)
        torch.testing.assert_close(ours_rv, ref_rv, atol=tol, rtol=tol)


def test_batch_norm_against_float64_numpy():
    x = np.random.default_rng(1).normal(2.0, 3.0, (16, 4, 5, 5))
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-5)
    y = EF.batch_norm(torch.from_numpy(x), None, None, training=True)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_lite_forms():
    x = torch.randn(32, 5, 3, 3, dtype=torch.float64) * 2 + 4
    mean, var = EF.batch_moments(x)
    centred = EF.batch_norm(x, None, None, training=True, scale=False)
    scaled = EF.batch_norm(x, None, None, training=True, center=False)
    torch.testing.assert_close(centred, x - mean.view(1, -1, 1, 1))
    torch.testing.assert_close(scaled, x / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5))


def test_batch_norm_one_value_per_channel_raises():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        EF.batch_norm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True)


@pytest.mark.parametrize("groups,shape", [
    (g, s) for g in (1, 2, 6) for s in [(4, 6), (4, 6, 5), (3, 6, 4, 4), (2, 6, 2, 3, 3)]
    if not (g == 6 and len(s) == 2)  # one value per group: nothing to normalize
])
def test_group_norm_matches_torch(groups, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape, dtype=torch.float64)
    y = EF.group_norm(x, groups, w, b, 1e-5)
    y_ref = F.group_norm(x, groups, w, b, 1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for a, r in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g)):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)


def test_group_norm_limits_are_layer_and_instance_norm():
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(EF.group_norm(x, 1), F.layer_norm(x, x.shape[1:]))
    torch.testing.assert_close(EF.group_norm(x, 4), F.instance_norm(x))


def test_low_precision_stats_in_float32():
    x = (torch.randn(64, 4, 6, 6) * 50 + 300).bfloat16()
    y = EF.batch_norm(x, None, None, training=True)
    assert y.dtype == torch.bfloat16
    ref = EF.batch_norm(x.float(), None, None, training=True)
    torch.testing.assert_close(y.float(), ref, atol=0.02, rtol=0.02)
    mean, var = EF.batch_moments(x)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
