"""Structured whitening (monarch-zca, circulant-zca) against float64 numpy/scipy references."""

import numpy as np
import pytest
import scipy.linalg
import torch

import exoticnorm as en
from exoticnorm import structured as S

EPS = 1e-5


def correlated(n, c, rho=0.8, seed=0, shift=2.0):
    rng = np.random.default_rng(seed)
    idx = np.arange(c)
    cov = rho ** np.abs(idx[:, None] - idx[None, :]) * np.outer(1 + idx % 3, 1 + idx % 3)
    return rng.multivariate_normal(np.full(c, shift) + idx, cov, size=n)


def circulant_data(n, c, seed=0):
    """Samples whose population covariance is circulant: Σ = circ(r), r_k = 0.7^min(k, c−k) + …"""
    rng = np.random.default_rng(seed)
    k = np.arange(c)
    r = 0.7 ** np.minimum(k, c - k) + 0.5 * (k == 0)
    return rng.multivariate_normal(np.zeros(c) + 1.0, scipy.linalg.circulant(r), size=n), scipy.linalg.circulant(r)


def inv_sqrt(cov):
    return np.real(scipy.linalg.inv(scipy.linalg.sqrtm(cov)))


def block_zca(x, b):
    """Per block of b consecutive columns: (x − μ) Σ_reg^(-1/2)."""
    out = np.empty_like(x)
    for s in range(0, x.shape[1], b):
        xc = x[:, s:s + b] - x[:, s:s + b].mean(0)
        out[:, s:s + b] = xc @ inv_sqrt(xc.T @ xc / len(x) + EPS * np.eye(xc.shape[1])).T
    return out


def monarch_reference(x, b):
    """Stage 1 block ZCA (blocks of b), then block ZCA of the groups {j, j + b, j + 2b, …}."""
    c = x.shape[1]
    y1 = block_zca(x, b)
    perm = np.arange(c).reshape(c // b, b).T.reshape(-1)  # new position → old channel
    y2 = block_zca(y1[:, perm], c // b)
    out = np.empty_like(y2)
    out[:, perm] = y2
    return out


def cov_of(y):
    y = y - y.mean(0)
    return y.T @ y / len(y)


# --- monarch ----------------------------------------------------------------------------

@pytest.mark.parametrize("c,b", [(12, 3), (12, 4), (8, 2)])
def test_monarch_matches_float64_reference(c, b):
    x = correlated(400, c, seed=1)
    y = en.MonarchZCANorm(c, block_size=b, shrinkage=0.0).double()(torch.from_numpy(x))
    np.testing.assert_allclose(y.detach().numpy(), monarch_reference(x, b), rtol=1e-8, atol=1e-8)


def test_monarch_whitens_each_second_stage_group_exactly():
    c, b = 12, 3
    x = correlated(2000, c, seed=2)
    y = en.MonarchZCANorm(c, block_size=b, shrinkage=0.0).double()(torch.from_numpy(x)).detach().numpy()
    cov = cov_of(y)
    for j in range(b):
        group = np.arange(j, c, b)
        np.testing.assert_allclose(cov[np.ix_(group, group)], np.eye(len(group)), atol=1e-3)
    assert np.abs(cov - np.eye(c)).max() > 0.05  # ...but not across them: not a full whitening


@pytest.mark.parametrize("b", [1, 6])
def test_monarch_limits_whiten_fully(b):
    x = correlated(3000, 6, seed=3)
    y = en.MonarchZCANorm(6, block_size=b, shrinkage=0.0).double()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(cov_of(y), np.eye(6), atol=1e-3)


def test_monarch_eval_affine_and_reference():
    m = en.MonarchZCANorm(12, block_size=3, momentum=None, shrinkage=0.0).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    for seed in range(3):
        m(torch.from_numpy(correlated(300, 12, seed=seed)))
    m.eval()
    x = torch.from_numpy(correlated(30, 12, seed=9))
    a, b = m.eval_affine()
    torch.testing.assert_close(m(x), x @ a.T + b)
    # independent: W = Pᵀ B₂ P B₁ from the running covariances with scipy
    w1 = scipy.linalg.block_diag(*[inv_sqrt(cv + EPS * np.eye(3)) for cv in m.running_cov.numpy()])
    b2 = scipy.linalg.block_diag(*[inv_sqrt(cv + EPS * np.eye(4)) for cv in m.running_cov2.numpy()])
    perm = np.arange(12).reshape(4, 3).T.reshape(-1)
    p = np.eye(12)[perm]  # (P v)_i = v[perm[i]]
    w = p.T @ b2 @ p @ w1
    expected = (x.numpy() - m.running_mean.numpy()) @ w.T * m.weight.detach().numpy() + m.bias.detach().numpy()
    np.testing.assert_allclose(m(x).detach().numpy(), expected, rtol=1e-7, atol=1e-8)


def test_monarch_pca_first_stage_whitens_closer_than_zca_stages():
    """With PCA blocks the second stage groups the blocks' principal components (module
    docstring): on data with one shared factor it removes the cross-block correlation that
    ZCA blocks leave."""
    rng = np.random.default_rng(4)
    shared = rng.standard_normal((4000, 1))
    x = shared @ rng.uniform(0.5, 1.5, (1, 16)) + 0.3 * rng.standard_normal((4000, 16))
    errs = {}
    for transform in ("zca", "pca"):
        m = en.MonarchZCANorm(16, block_size=4, shrinkage=0.0, transform=transform).double()
        errs[transform] = np.abs(cov_of(m(torch.from_numpy(x)).detach().numpy()) - np.eye(16)).max()
    assert errs["pca"] < 0.5 * errs["zca"]


def test_monarch_fewer_samples_than_channels_stays_finite():
    x = torch.randn(8, 120, requires_grad=True)
    y = en.MonarchZCANorm(120)(x)  # blocks of 10 and 12 channels from 8 samples: Ledoit–Wolf
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e3


def test_monarch_bad_block_size_lists_valid_ones():
    with pytest.raises(ValueError, match=r"choose one of \[1, 2, 3, 4, 6, 12\]"):
        en.MonarchZCANorm(12, block_size=5)
    with pytest.raises(ValueError, match="does not divide"):
        en.create_norm("monarch-zca", 8, block_size=0)
    assert en.MonarchZCANorm(64).block_size == 8 and en.MonarchZCANorm(7).block_size == 1


# --- circulant ----------------------------------------------------------------------------

def circulant_reference(x, eps=EPS):
    """Average the wrapped diagonals of the batch covariance into a circulant R, then
    (x − μ) R_reg^(-1/2) with scipy (no FFT)."""
    c = x.shape[1]
    cov = cov_of(x)
    r = np.array([np.mean([cov[i, (i + k) % c] for i in range(c)]) for k in range(c)])
    circ = scipy.linalg.circulant(r).T  # circ[i, j] = r[(j − i) mod c]
    return (x - x.mean(0)) @ inv_sqrt(circ + eps * np.eye(c)).T


@pytest.mark.parametrize("c", [2, 7, 8])
def test_circulant_matches_float64_reference(c):
    x = correlated(300, c, seed=5)
    y = en.CirculantZCANorm(c).double()(torch.from_numpy(x))
    np.testing.assert_allclose(y.detach().numpy(), circulant_reference(x), rtol=1e-8, atol=1e-8)


def test_circulant_whitens_circulant_data_and_only_the_circulant_part_otherwise():
    x, _ = circulant_data(20000, 16, seed=6)
    y = en.CirculantZCANorm(16).double()(torch.from_numpy(x)).detach().numpy()
    assert np.abs(cov_of(y) - np.eye(16)).max() < 0.03  # sampling error only
    z = correlated(20000, 16, seed=7)  # not circulant: the scales differ per channel
    yz = en.CirculantZCANorm(16).double()(torch.from_numpy(z)).detach().numpy()
    cov = cov_of(yz)
    assert np.abs(cov - np.eye(16)).max() > 0.1
    r = [np.mean([cov[i, (i + k) % 16] for i in range(16)]) for k in range(16)]
    np.testing.assert_allclose(r, np.eye(16)[0], atol=1e-3)  # its circulant projection is I


def test_circulant_eval_affine_matches_eval_and_a_dense_reference():
    m = en.CirculantZCANorm(9, momentum=None).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    batches = [correlated(200, 9, seed=s) for s in range(3)]
    for b in batches:
        m(torch.from_numpy(b))
    m.eval()
    x = torch.from_numpy(correlated(20, 9, seed=8))
    a, b = m.eval_affine()
    torch.testing.assert_close(m(x), x @ a.T + b)
    # running spectrum = the circulant projection of the average unbiased covariance
    cov = np.mean([np.cov(bb.T) for bb in batches], axis=0)
    r = np.array([np.mean([cov[i, (i + k) % 9] for i in range(9)]) for k in range(9)])
    w = inv_sqrt(scipy.linalg.circulant(r).T + EPS * np.eye(9))
    expected = (x.numpy() - m.running_mean.numpy()) @ w.T * m.weight.detach().numpy() + m.bias.detach().numpy()
    np.testing.assert_allclose(m(x).detach().numpy(), expected, rtol=1e-7, atol=1e-8)
    m.eval_from = "whitening"
    assert torch.isfinite(m(x)).all() and not torch.allclose(m(x), x @ a.T + b)


def test_circulant_few_samples_stay_finite():
    x = torch.randn(2, 120, requires_grad=True)
    y = en.CirculantZCANorm(120)(x)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_circulant_on_one_channel_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 channels"):
        en.create_norm("circulant-zca", 1)
    with pytest.raises(ValueError, match="shrinkage"):
        en.CirculantZCANorm(4, shrinkage=2.0)


@pytest.mark.parametrize("name", ["monarch-zca", "circulant-zca"])
def test_autocast_keeps_statistics_in_float32(name):
    conv = torch.nn.Conv2d(6, 6, 1)
    m = en.create_norm(name, 6)
    x = torch.randn(32, 6, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = m(h)
    assert y.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for b in m.buffers() if b.is_floating_point())
    torch.testing.assert_close(y.float(), en.create_norm(name, 6)(h.float()), atol=0.03, rtol=0.02)
