"""group-whitening (Huang et al. 2021) against a float64 numpy/scipy reference."""

import numpy as np
import pytest
import scipy.linalg
import torch

import exoticnorm as en

EPS = 1e-5


def reference(x, g, eps=EPS):
    """Per sample: rows = the g groups' values (channels × positions), centred per row,
    whitened by (Σ + eps I)^(-1/2), Σ = X_c X_cᵀ / m."""
    n, c = x.shape[:2]
    out = np.empty_like(x)
    for i in range(n):
        rows = x[i].reshape(g, -1)
        xc = rows - rows.mean(1, keepdims=True)
        cov = xc @ xc.T / rows.shape[1] + eps * np.eye(g)
        out[i] = (np.real(scipy.linalg.inv(scipy.linalg.sqrtm(cov))) @ xc).reshape(x[i].shape)
    return out


def mixed_input(shape, seed=0):
    """Channels of a sample correlated with each other (a shared per-sample factor)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    return x + 0.8 * x[:, :1] + rng.standard_normal((shape[0], 1) + (1,) * (len(shape) - 2)) * 3


@pytest.mark.parametrize("shape,g", [((4, 8, 5, 5), 4), ((3, 6, 7), 3), ((5, 12, 2, 2, 3), 6), ((6, 16), 2)])
def test_matches_float64_reference(shape, g):
    x = mixed_input(shape)
    y = en.GroupWhitening(shape[1], num_groups=g, shrinkage=0.0).double()(torch.from_numpy(x))
    np.testing.assert_allclose(y.detach().numpy(), reference(x, g), rtol=1e-8, atol=1e-8)


def test_each_sample_is_whitened_on_its_own():
    x = torch.from_numpy(mixed_input((5, 8, 6, 6), seed=1))
    m = en.GroupWhitening(8, num_groups=4, shrinkage=0.0).double()
    y = m(x).detach()
    for i in range(5):
        rows = y[i].reshape(4, -1)
        torch.testing.assert_close(rows @ rows.T / rows.shape[1], torch.eye(4, dtype=torch.float64),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(m(x[i : i + 1]), y[i : i + 1])  # batch-independent, batch size 1
    m.eval()
    torch.testing.assert_close(m(x), y)  # eval = training: no running statistics
    assert not list(m.buffers())


def test_one_group_is_layernorm():
    x = torch.from_numpy(mixed_input((4, 6, 3, 3), seed=2))
    torch.testing.assert_close(en.GroupWhitening(6, num_groups=1).double()(x), en.LayerNorm(6).double()(x))


def test_gradcheck_with_shrinkage_in_the_graph():
    """m = 4 values per group < 4g: Ledoit–Wolf shrinkage is on, and differentiated."""
    x = torch.from_numpy(mixed_input((3, 6, 2), seed=3)).requires_grad_()
    m = en.GroupWhitening(6, num_groups=3).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    assert torch.autograd.gradcheck(m, (x,))


@pytest.mark.parametrize("transform", ["cholesky", "pca"])
def test_other_transforms_whiten_each_sample(transform):
    x = torch.from_numpy(mixed_input((3, 8, 5, 5), seed=4))
    y = en.GroupWhitening(8, num_groups=4, shrinkage=0.0, transform=transform).double()(x)
    for i in range(3):
        rows = y[i].reshape(4, -1)
        torch.testing.assert_close(rows @ rows.T / rows.shape[1], torch.eye(4, dtype=torch.float64),
                                   atol=1e-4, rtol=0)


def test_default_groups_fit_every_lenet_and_resnet_width():
    for c, g in {6: 3, 8: 4, 16: 8, 84: 14, 120: 15, 64: 16, 512: 16, 1: 1, 2: 1}.items():
        assert en.GroupWhitening(c).num_groups == g


def test_bad_input():
    with pytest.raises(ValueError, match=r"choose one of \[1, 2, 3, 4, 6, 12\]"):
        en.GroupWhitening(12, num_groups=5)
    with pytest.raises(en.InputError, match="1 value per group"):
        en.GroupWhitening(8, num_groups=8)(torch.randn(4, 8))
    with pytest.raises(ValueError, match="newton"):
        en.GroupWhitening(8, transform="pca", method="newton")


def test_autocast_computes_in_float32():
    conv = torch.nn.Conv2d(8, 8, 1)
    m = en.GroupWhitening(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(torch.randn(4, 8, 6, 6))
        y = m(h)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(h.float()), atol=0.03, rtol=0.02)


def test_fold_leaves_it_in_place():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), en.GroupWhitening(8))
    _, left = en.fold_norms(model)
    assert left == [("1", "its eval transform is not an affine map")]
