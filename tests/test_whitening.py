"""ZCA, block-diagonal and sparsified whitening against float64 numpy/scipy references."""


import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import exoticnorm as en
from exoticnorm import whitening as W


def correlated(n, c, rho=0.9, seed=0, shift=3.0):
    """Samples with corr(i, j) = rho^|i−j| and per-channel scales 1…c: strongly correlated."""
    rng = np.random.default_rng(seed)
    idx = np.arange(c)
    cov = rho ** np.abs(idx[:, None] - idx[None, :]) * np.outer(idx + 1, idx + 1)
    return rng.multivariate_normal(np.full(c, shift), cov, size=n)


def zca_reference(x, eps, group=None):
    """y = (x − μ) Σ_reg^(-1/2) per block, in float64 with scipy."""
    n, c = x.shape
    group = group or c
    y = np.empty_like(x)
    for start in range(0, c, group):
        block = x[:, start : start + group]
        xc = block - block.mean(0)
        cov = xc.T @ xc / n + eps * np.eye(block.shape[1])
        y[:, start : start + group] = xc @ np.real(scipy.linalg.inv(scipy.linalg.sqrtm(cov))).T
    return y


@pytest.mark.parametrize("c", [8, 32])
def test_zca_whitens_to_identity_float32(c):
    x = torch.tensor(correlated(50_000, c), dtype=torch.float32)
    y = en.ZCANorm(c, method="eigh")(x)
    cov = torch.cov(y.T.double(), correction=0)
    assert (cov - torch.eye(c, dtype=torch.float64)).abs().max() < 1e-3


@pytest.mark.parametrize("name,kw,group", [("zca", {}, None), ("block-zca", {"group_size": 4}, 4),
                                           ("block-zca", {"group_size": 3}, 3)])
def test_matches_float64_scipy_reference(name, kw, group):
    x = correlated(500, 10, seed=1)
    y = en.create_norm(name, 10, method="eigh", shrinkage=0.0, **kw).double()(torch.from_numpy(x))
    np.testing.assert_allclose(y.detach().numpy(), zca_reference(x, 1e-5, group), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("shape", [(64, 5), (16, 5, 7), (8, 5, 4, 3), (4, 5, 2, 3, 3)])
def test_every_input_rank_matches_flattened_reference(shape):
    x = torch.randn(shape, dtype=torch.float64) @ torch.eye(shape[-1], dtype=torch.float64) if len(shape) == 2 else torch.randn(shape, dtype=torch.float64)
    x = x + 0.5 * x[:, :1]  # correlate every channel with the first
    y = en.ZCANorm(5, shrinkage=0.0).double()(x)
    flat = x.movedim(1, -1).reshape(-1, 5).numpy()
    ref = zca_reference(flat, 1e-5)
    np.testing.assert_allclose(y.detach().movedim(1, -1).reshape(-1, 5).numpy(), ref, rtol=1e-8, atol=1e-8)


def _gradcheck_input(n, c, degenerate):
    if degenerate:  # an exactly identity covariance: every eigenvalue repeated
        q, _ = torch.linalg.qr(torch.randn(n, c, dtype=torch.float64))
        x = q - q.mean(0)
        q, _ = torch.linalg.qr(x)
        x = q * np.sqrt(n)
    else:
        x = torch.from_numpy(correlated(n, c, seed=2))
    return x.requires_grad_()


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("degenerate", [False, True])
def test_gradcheck_float64(method, degenerate):
    x = _gradcheck_input(12, 4, degenerate)
    norm = en.ZCANorm(4, method=method, shrinkage=0.0, track_running_stats=False).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
    assert torch.autograd.gradcheck(norm, (x,), atol=1e-6, rtol=1e-5)


def test_repeated_eigenvalues_give_finite_gradients_where_torch_eigh_fails():
    cov = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1).requires_grad_()
    W.inv_sqrt_eigh(cov).sum().backward()
    assert torch.isfinite(cov.grad).all()
    torch.testing.assert_close(cov.grad, torch.full((2, 4, 4), -0.5, dtype=torch.float64))  # d sum(Σ^-½) at I
    cov2 = torch.eye(4, dtype=torch.float64).requires_grad_()
    lam, u = torch.linalg.eigh(cov2)
    ((u / lam.sqrt()) @ u.mT).sum().backward()  # the naive path
    assert not torch.isfinite(cov2.grad).all()


def test_block_limits():
    x = torch.from_numpy(correlated(256, 6, seed=3)).float().reshape(32, 8, 6).transpose(1, 2).contiguous()
    g = torch.randn_like(x)
    one = en.BlockZCANorm(6, group_size=1)
    bn = en.BatchNorm(6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = one(xa), bn(xb)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one.running_mean, bn.running_mean)
    torch.testing.assert_close(one.running_cov.flatten(), bn.running_var, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["whitening", "covariance"])
def test_sparse_limits(mode):
    x = torch.from_numpy(correlated(2000, 8, seed=4))
    diagonal = en.SparseZCANorm(8, density=0.0, sparsify=mode).double()(x)
    torch.testing.assert_close(diagonal, en.BatchNorm(8).double()(x), atol=1e-10, rtol=1e-10)


def test_sparse_whitening_keeps_unit_variance_and_pattern():
    x = torch.from_numpy(correlated(5000, 8, seed=5))
    m = en.SparseZCANorm(8, density=0.25).double()
    y = m(x)
    var = y.var(0, unbiased=False)
    torch.testing.assert_close(var, torch.ones(8, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    xc = x - x.mean(0)
    cov = W.regularize((xc.T @ xc / len(x)).unsqueeze(0), 1e-5)
    ws = W.sparsify(W.inv_sqrt_eigh(cov), cov, 0.25)[0]
    off = (ws != 0).sum() - 8
    assert off == round(0.25 * 56)


def test_eval_is_the_cached_affine_map_of_running_stats():
    m = en.BlockZCANorm(10, group_size=4, momentum=None)
    for seed in range(3):
        m(torch.from_numpy(correlated(400, 10, seed=seed)).float())
    assert not m.running_cov.requires_grad and m.running_cov.grad_fn is None
    m.eval()
    x = torch.from_numpy(correlated(50, 10, seed=9)).float()
    a, b = m.eval_affine()
    torch.testing.assert_close(m(x), x @ a.T + b, atol=1e-5, rtol=1e-5)
    cached = m._eval_cache
    m(x)
    assert m._eval_cache is cached  # not recomputed while the statistics stay
    m.load_state_dict(m.state_dict())
    m(x)
    assert m._eval_cache is not cached  # recomputed after a load


def test_cumulative_running_covariance_and_state_dict():
    m = en.ZCANorm(4, momentum=None).double()
    batches = [torch.from_numpy(correlated(100, 4, seed=s)) for s in range(3)]
    for b in batches:
        m(b)
    expected = torch.stack([torch.cov(b.T) for b in batches]).mean(0)
    torch.testing.assert_close(m.running_cov[0], expected)
    torch.testing.assert_close(m.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    other = en.ZCANorm(4).double()
    other.load_state_dict(m.state_dict())
    torch.testing.assert_close(other.running_cov, m.running_cov)


@pytest.mark.parametrize("name", ["zca", "block-zca", "sparse-zca"])
def test_fewer_samples_than_channels_stays_finite(name):
    x = torch.randn(8, 120, requires_grad=True)
    m = en.create_norm(name, 120)
    y = m(x)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert x.grad.abs().max() < 1e3


def test_autocast_keeps_statistics_in_float32():
    conv = nn.Conv2d(6, 6, 1)
    m = en.ZCANorm(6)
    x = torch.randn(32, 6, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = m(h)
    assert h.dtype == y.dtype == torch.bfloat16 and m.running_cov.dtype == torch.float32
    ref = en.ZCANorm(6)(h.float())  # the same values, whitened in float32 outside autocast
    torch.testing.assert_close(y.float(), ref, atol=0.02, rtol=0.01)


def test_eigh_failure_falls_back_with_warning(monkeypatch):
    """eigh failing in the one-call C++ step sends the batch to the torch ops, whose eigh is
    retried with jitter, then replaced by Newton–Schulz, each with a warning."""
    from exoticnorm import whitening_kernel

    def failing(*args):
        raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")

    monkeypatch.setattr(whitening_kernel, "zca_step", failing)
    calls = {"n": 0}
    real = torch.linalg.eigh

    def flaky(a, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.linalg.LinAlgError("failed to converge")
        return real(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    with pytest.warns(RuntimeWarning, match="jitter"):
        y = en.ZCANorm(4, method="eigh")(torch.randn(64, 4))
    assert torch.isfinite(y).all()

    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: (_ for _ in ()).throw(torch.linalg.LinAlgError("x")))
    with pytest.warns(RuntimeWarning, match="Newton"):
        y = en.ZCANorm(4, method="eigh")(torch.randn(64, 4))
    assert torch.isfinite(y).all()


def test_bad_options():
    with pytest.raises(ValueError, match="unknown method"):
        en.ZCANorm(4, method="svd")
    with pytest.raises(ValueError, match="density"):
        en.SparseZCANorm(4, density=1.5)
    with pytest.raises(ValueError, match="group_size"):
        en.BlockZCANorm(4, group_size=0)
    with pytest.raises(en.InputError, match="1 value per channel"):
        en.ZCANorm(4)(torch.randn(1, 4))


def test_registered_and_convertible():
    for name in ("zca", "block-zca", "sparse-zca"):
        assert name in en.available_norms()
    model = en.convert_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), "block-zca", group_size=4)
    assert type(model[1]) is en.BlockZCANorm and model[1].group_size == 4
    assert model(torch.randn(4, 3, 6, 6)).shape == (4, 8, 4, 4)


def test_eval_from_running_whitening_matrix():
    m = en.ZCANorm(5, momentum=None, shrinkage=0.0).double()
    batches = [torch.from_numpy(correlated(200, 5, seed=s)) for s in range(3)]
    mats = []
    for b in batches:
        m(b)
        xc = b - b.mean(0)
        cov = W.regularize((xc.T @ xc / len(b)).unsqueeze(0), 1e-5)
        mats.append(W.inv_sqrt_eigh(cov)[0])
    torch.testing.assert_close(m.running_whitening[0], torch.stack(mats).mean(0))
    x = torch.from_numpy(correlated(20, 5, seed=7))
    m.eval()
    from_cov = m(x)
    m.eval_from = "whitening"  # both statistics are kept: switchable after training
    expected = (x - m.running_mean) @ m.running_whitening[0].T
    torch.testing.assert_close(m(x), expected)
    assert not torch.allclose(from_cov, expected)
    with pytest.raises(ValueError, match="eval_from"):
        en.ZCANorm(5, eval_from="svd")


def test_eval_output_matches_an_independent_scipy_reference():
    m = en.BlockZCANorm(6, group_size=4, momentum=None, shrinkage=0.0).double()
    for seed in range(3):
        m(torch.from_numpy(correlated(300, 6, seed=seed)))
    m.eval()
    x = correlated(40, 6, seed=11)
    mean, cov = m.running_mean.numpy(), m.running_cov.numpy()
    expected = np.empty_like(x)
    for g, (lo, hi) in enumerate([(0, 4), (4, 6)]):
        c = hi - lo
        sigma = cov[g, :c, :c] + 1e-5 * np.eye(c)
        w = np.real(scipy.linalg.inv(scipy.linalg.sqrtm(sigma)))
        expected[:, lo:hi] = (x[:, lo:hi] - mean[lo:hi]) @ w.T
    np.testing.assert_allclose(m(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-8, atol=1e-8)


def test_gradient_penalty_through_zca_raises_instead_of_a_wrong_answer():
    """Double backward used to return d loss/dW[0,0] = 2.437 against 0.119 by finite differences."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), en.ZCANorm(6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    x = torch.randn(32, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(model(x).sum(), x, create_graph=True)


@pytest.mark.parametrize("route", ["auto", "device", "host"])
def test_cuda_eigh_route_is_checked_everywhere_and_only_moves_cuda_work(route, monkeypatch):
    """EXOTICNORM_CUDA_EIGH (tests/test_cuda.py checks both routes on a GPU): on the CPU every route
    is torch's eigh; a misspelt route is a clear error on any device."""
    monkeypatch.setenv("EXOTICNORM_CUDA_EIGH", route)
    cov = torch.eye(3, dtype=torch.float64)[None] * torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    assert not W.eigh_on_host(cov)
    lam, u = W.eigh(cov)
    torch.testing.assert_close(lam, torch.tensor([[1.0, 4.0, 9.0]], dtype=torch.float64))
    monkeypatch.setenv("EXOTICNORM_CUDA_EIGH", "gpu")
    with pytest.raises(ValueError, match="EXOTICNORM_CUDA_EIGH='gpu': use one of auto, device, host"):
        W.eigh(cov)
