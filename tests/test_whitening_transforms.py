"""Cholesky and PCA whitening (``transform=``) of the ZCA family, against float64 numpy/scipy."""

import copy

import numpy as np
import pytest
import scipy.linalg
import torch

import exoticnorm as en
from exoticnorm import whitening as W

EPS = 1e-5


def correlated(n, c, rho=0.9, seed=0, shift=3.0):
    """corr(i, j) = rho^|i−j|, channel scales 1…c."""
    rng = np.random.default_rng(seed)
    idx = np.arange(c)
    cov = rho ** np.abs(idx[:, None] - idx[None, :]) * np.outer(idx + 1, idx + 1)
    return rng.multivariate_normal(np.full(c, shift), cov, size=n)


def cholesky_reference(x, eps=EPS):
    """y = L⁻¹ (x − μ), Σ + eps I = L Lᵀ, by scipy (lower Cholesky, triangular solve)."""
    xc = x - x.mean(0)
    cov = xc.T @ xc / len(x) + eps * np.eye(x.shape[1])
    chol = scipy.linalg.cholesky(cov, lower=True)
    return scipy.linalg.solve_triangular(chol, xc.T, lower=True).T


def pca_reference(x, eps=EPS):
    """y_k = (x − μ)·u_k / √λ_k from the SVD of the centred data (an independent route to
    the eigenvectors), λ descending, each u_k's largest-|entry| made positive."""
    xc = x - x.mean(0)
    n, c = x.shape
    _, sing, vt = scipy.linalg.svd(xc / np.sqrt(n), full_matrices=False)
    lam = sing**2 + eps
    u = vt.T
    pivot = np.abs(u).argmax(0)
    u = u * np.sign(u[pivot, np.arange(c)])
    return xc @ u / np.sqrt(lam), u


def cov_of(y):
    y = y - y.mean(0)
    return y.T @ y / len(y)


@pytest.mark.parametrize("transform,reference", [("cholesky", cholesky_reference),
                                                 ("pca", lambda x: pca_reference(x)[0])])
def test_zca_transforms_match_float64_references(transform, reference):
    x = correlated(500, 10, seed=1)
    m = en.ZCANorm(10, shrinkage=0.0, transform=transform).double()
    y = m(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, reference(x), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(cov_of(y), np.eye(10), atol=1e-3)  # the ridge eps leaves ~1e-4


def test_cholesky_whitening_matrix_is_lower_triangular_and_solves_the_factor():
    x = correlated(400, 6, seed=2)
    m = en.ZCANorm(6, shrinkage=0.0, transform="cholesky", momentum=1.0).double()
    m(torch.from_numpy(x))
    w = m.running_whitening[0].numpy()
    assert np.abs(np.triu(w, 1)).max() == 0.0
    xc = x - x.mean(0)
    chol = scipy.linalg.cholesky(xc.T @ xc / len(x) + EPS * np.eye(6), lower=True)
    np.testing.assert_allclose(w @ chol, np.eye(6), atol=1e-10)


def test_pca_matrix_sign_and_order_convention():
    x = correlated(3000, 6, seed=3)
    m = en.ZCANorm(6, shrinkage=0.0, transform="pca", momentum=1.0).double()
    m(torch.from_numpy(x))
    w = m.running_whitening[0].numpy()
    _, u = pca_reference(x)
    lam = np.linalg.eigvalsh(cov_of(x) + EPS * np.eye(6))[::-1]
    np.testing.assert_allclose(w, (u / np.sqrt(lam)).T, rtol=1e-8, atol=1e-10)
    rows = w / np.linalg.norm(w, axis=1, keepdims=True)  # the eigenvectors again
    assert (rows[np.arange(6), np.abs(rows).argmax(1)] > 0).all()
    assert np.all(np.diff(np.linalg.norm(w, axis=1)) > 0)  # 1/√λ grows: λ descending


def test_pca_is_stable_from_one_batch_to_the_next():
    """Two batches of one distribution give nearly the same W: the signs and the order do not
    flip (torch's eigh alone fixes neither)."""
    mats = []
    for seed in (4, 5):
        m = en.ZCANorm(6, shrinkage=0.0, transform="pca", momentum=1.0).double()
        m(torch.from_numpy(correlated(20000, 6, seed=seed)))
        mats.append(m.running_whitening[0])
    rel = (mats[0] - mats[1]).norm() / mats[0].norm()
    assert rel < 0.05


@pytest.mark.parametrize("transform", ["cholesky", "pca"])
def test_block_transforms_match_per_block_references(transform):
    x = correlated(400, 7, seed=6)
    y = en.BlockZCANorm(7, group_size=3, shrinkage=0.0, transform=transform).double()(torch.from_numpy(x))
    ref = cholesky_reference if transform == "cholesky" else (lambda b: pca_reference(b)[0])
    expected = np.concatenate([ref(x[:, s:s + 3]) for s in range(0, 7, 3)], axis=1)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("transform", ["cholesky", "pca"])
def test_group_size_one_is_batchnorm(transform):
    x = torch.from_numpy(correlated(300, 5, seed=7))
    y = en.BlockZCANorm(5, group_size=1, transform=transform).double()(x)
    torch.testing.assert_close(y, en.BatchNorm(5).double()(x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("transform", ["cholesky", "pca"])
@pytest.mark.parametrize("shape", [(24, 4), (6, 4, 5)])
def test_gradcheck_float64(transform, shape):
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.8, 1.0, 0.0, 0.0], [0.3, -0.5, 1.0, 0.0],
                        [0.0, 0.2, 0.4, 2.0]], dtype=torch.float64)
    x = torch.einsum("dc,nc...->nd...", mix, torch.randn(shape, dtype=torch.float64)).requires_grad_()
    norm = en.BlockZCANorm(4, group_size=4, shrinkage=0.0, transform=transform,
                           track_running_stats=False).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    assert torch.autograd.gradcheck(norm, (x,), atol=1e-6, rtol=1e-5)


def test_pca_gradient_is_finite_at_repeated_eigenvalues():
    """An exactly white batch (every eigenvalue equal): U is arbitrary, the backward leaves the
    rotation inside the eigenspace out and stays finite."""
    q, _ = torch.linalg.qr(torch.randn(32, 4, dtype=torch.float64))
    x = q - q.mean(0)
    q, _ = torch.linalg.qr(x)
    x = (q * np.sqrt(32)).requires_grad_()
    y = en.ZCANorm(4, shrinkage=0.0, transform="pca", track_running_stats=False).double()(x)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("transform", ["cholesky", "pca"])
def test_fewer_samples_than_channels_stays_finite(transform):
    x = torch.randn(8, 60, requires_grad=True)
    y = en.ZCANorm(60, transform=transform)(x)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("transform", ["cholesky", "pca"])
def test_eval_from_covariance_and_whitening(transform):
    m = en.ZCANorm(5, momentum=None, shrinkage=0.0, transform=transform).double()
    batches = [torch.from_numpy(correlated(300, 5, seed=s)) for s in range(3)]
    for b in batches:
        m(b)
    m.eval()
    x = correlated(20, 5, seed=9)
    mean = m.running_mean.numpy()
    cov = m.running_cov[0].numpy() + EPS * np.eye(5)
    if transform == "cholesky":
        w = scipy.linalg.inv(scipy.linalg.cholesky(cov, lower=True))
    else:
        lam, u = np.linalg.eigh(cov)
        lam, u = lam[::-1], u[:, ::-1]
        u = u * np.sign(u[np.abs(u).argmax(0), np.arange(5)])
        w = (u / np.sqrt(lam)).T
    np.testing.assert_allclose(m(torch.from_numpy(x)).detach().numpy(), (x - mean) @ w.T, rtol=1e-7, atol=1e-8)
    m.eval_from = "whitening"
    torch.testing.assert_close(m(torch.from_numpy(x)), (torch.from_numpy(x) - m.running_mean) @ m.running_whitening[0].T)


@pytest.mark.parametrize("transform", ["cholesky", "pca"])
def test_autocast_keeps_statistics_in_float32(transform):
    conv = torch.nn.Conv2d(6, 6, 1)
    m = en.ZCANorm(6, transform=transform)
    x = torch.randn(32, 6, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = m(h)
    assert y.dtype == torch.bfloat16 and m.running_cov.dtype == torch.float32
    ref = en.ZCANorm(6, transform=transform)(h.float())
    torch.testing.assert_close(y.float(), ref, atol=0.03, rtol=0.02)


def test_cholesky_failure_retries_with_jitter(monkeypatch):
    real = torch.linalg.cholesky
    calls = {"n": 0}

    def flaky(a, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.linalg.LinAlgError("not positive definite")
        return real(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "cholesky", flaky)
    with pytest.warns(RuntimeWarning, match="jitter"):
        y = en.ZCANorm(4, transform="cholesky")(torch.randn(64, 4))
    assert torch.isfinite(y).all()


def test_bad_transform_options():
    with pytest.raises(ValueError, match="unknown transform"):
        en.ZCANorm(4, transform="svd")
    with pytest.raises(ValueError, match="newton"):
        en.BlockZCANorm(4, transform="cholesky", method="newton")
    with pytest.raises(ValueError, match="unknown whitening transform"):
        W.whiten_by(torch.eye(2)[None], "qr")
    m = en.ZCANorm(4, transform="pca")
    assert "transform=pca" in repr(m)
    assert copy.deepcopy(m).transform == "pca"
