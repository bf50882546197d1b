"""switchable-whitening (Pan et al. 2019) against a float64 numpy/scipy reference and its limits."""

import numpy as np
import pytest
import scipy.linalg
import torch

import exoticnorm as en
from exoticnorm.switchable import COMPONENTS

EPS = 1e-5


def inv_sqrt(cov):
    return np.real(scipy.linalg.inv(scipy.linalg.sqrtm(cov)))


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def reference(x, group, components, mean_logits, cov_logits, batch=None):
    """Per sample and group: μ̂ = Σ ω_k μ_k, Σ̂ = Σ ω'_k Σ_k, y = (Σ̂ + eps I)^(-1/2)(x − μ̂).
    ``batch`` = (mean (C,), cov per group) for eval; else the batch's own (biased)."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)  # (N, C, S)
    om, oc = softmax(mean_logits), softmax(cov_logits)
    lmean = flat.reshape(n, -1).mean(1)
    lvar = flat.reshape(n, -1).var(1)
    out = np.empty_like(flat)
    for s in range(0, c, group):
        ch = slice(s, min(s + group, c))
        xs = flat[:, ch]  # (N, c, S)
        k = xs.shape[1]
        if batch is None:
            pooled = xs.transpose(1, 0, 2).reshape(k, -1)
            bmean = pooled.mean(1)
            bcov = np.cov(pooled, bias=True)
        else:
            bmean, bcov = batch[0][ch], batch[1][s // group][:k, :k]
        for i in range(n):
            imean = xs[i].mean(1)
            ic = xs[i] - imean[:, None]
            icov = ic @ ic.T / xs.shape[2]
            stats = {"bw": (bmean, bcov), "bn": (bmean, np.diag(np.diag(bcov))),
                     "iw": (imean, icov), "in": (imean, np.diag(np.diag(icov))),
                     "ln": (np.full(k, lmean[i]), lvar[i] * np.eye(k))}
            mu = sum(om[j] * stats[name][0] for j, name in enumerate(components))
            cov = sum(oc[j] * stats[name][1] for j, name in enumerate(components))
            out[i, ch] = inv_sqrt(np.atleast_2d(cov) + EPS * np.eye(k)) @ (xs[i] - mu[:, None])
    return out.reshape(x.shape)


def data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    return x + 0.7 * x[:, :1] + 2.0


def module(c, logits, **kw):
    m = en.SwitchableWhitening(c, shrinkage=0.0, **kw).double()
    with torch.no_grad():
        m.mean_weight.copy_(torch.from_numpy(logits[0]))
        if m.cov_weight is not None:
            m.cov_weight.copy_(torch.from_numpy(logits[1]))
    return m


@pytest.mark.parametrize("shape,group", [((6, 8, 4, 4), 4), ((5, 6, 9), 4), ((40, 5), 5)])
def test_training_matches_float64_reference(shape, group):
    x = data(shape)
    logits = (np.array([0.3, -0.2, 0.1, 0.5, -0.4]), np.array([-0.1, 0.4, 0.2, -0.3, 0.0]))
    y = module(shape[1], logits, group_size=group)(torch.from_numpy(x))
    np.testing.assert_allclose(y.detach().numpy(), reference(x, group, COMPONENTS, *logits), rtol=1e-7, atol=1e-8)


def test_eval_uses_running_batch_statistics_and_each_sample_s_own():
    logits = (np.array([0.3, -0.2, 0.1, 0.5, -0.4]), np.array([-0.1, 0.4, 0.2, -0.3, 0.0]))
    m = module(8, logits, group_size=4, momentum=None)
    batches = [data((6, 8, 3, 3), seed=s) for s in range(3)]
    for b in batches:
        m(torch.from_numpy(b))
    pooled = [b.transpose(1, 0, 2, 3).reshape(8, -1) for b in batches]
    np.testing.assert_allclose(m.running_mean.numpy(), np.mean([p.mean(1) for p in pooled], 0), atol=1e-12)
    np.testing.assert_allclose(m.running_cov[1].numpy(), np.mean([np.cov(p[4:]) for p in pooled], 0), atol=1e-12)
    m.eval()
    x = data((3, 8, 3, 3), seed=7)
    expected = reference(x, 4, COMPONENTS, *logits, batch=(m.running_mean.numpy(), m.running_cov.numpy()))
    np.testing.assert_allclose(m(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("component,other", [("bw", lambda: en.ZCANorm(6, shrinkage=0.0)),
                                             ("bn", lambda: en.BatchNorm(6)),
                                             ("in", lambda: en.InstanceNorm(6)),
                                             ("ln", lambda: en.LayerNorm(6))])
def test_single_components_are_the_classic_norms(component, other):
    x = torch.from_numpy(data((8, 6, 5, 5), seed=1))
    m = en.SwitchableWhitening(6, group_size=6, components=(component,), shrinkage=0.0).double()
    torch.testing.assert_close(m(x), other().double()(x), atol=1e-8, rtol=1e-8)


def test_instance_whitening_whitens_each_sample():
    x = torch.from_numpy(data((3, 4, 8, 8), seed=2))
    y = en.SwitchableWhitening(4, components=("iw",)).double()(x)
    for i in range(3):
        rows = y[i].reshape(4, -1)
        rows = rows - rows.mean(1, keepdim=True)
        torch.testing.assert_close(rows @ rows.T / rows.shape[1], torch.eye(4, dtype=torch.float64),
                                   atol=1e-4, rtol=0)


def test_gradcheck_reaches_the_mixing_weights():
    x = torch.from_numpy(data((4, 4, 3), seed=3)).requires_grad_()
    m = en.SwitchableWhitening(4, track_running_stats=False).double()
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5, -0.4]))
        m.cov_weight.copy_(torch.tensor([-0.1, 0.4, 0.2, -0.3, 0.0]))

    def f(x, mw, cw):
        return torch.func.functional_call(m, {"mean_weight": mw, "cov_weight": cw}, (x,))

    params = (m.mean_weight.detach().clone().requires_grad_(), m.cov_weight.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(f, (x, *params))


def test_eval_affine_only_for_batch_components():
    m = en.SwitchableWhitening(6, group_size=4, components=("bw", "bn"), momentum=None).double()
    with torch.no_grad():
        m.cov_weight.copy_(torch.tensor([0.4, -0.3]))
        m.weight.uniform_(0.5, 1.5)
    for s in range(3):
        m(torch.from_numpy(data((20, 6), seed=s)))
    m.eval()
    x = torch.from_numpy(data((10, 6), seed=9))
    a, b = m.eval_affine()
    torch.testing.assert_close(m(x), x @ a.T + b)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6).double(), m).eval()
    folded, left = en.fold_norms(model)
    assert left == []
    torch.testing.assert_close(folded(x[:, :3]), model(x[:, :3]))
    full = torch.nn.Sequential(torch.nn.Linear(3, 6), en.SwitchableWhitening(6)).eval()
    _, left = en.fold_norms(full)
    assert len(left) == 1 and "not an affine map" in left[0][1]


def test_tied_weights_and_bad_options():
    m = en.SwitchableWhitening(8, tie_weight=True)
    assert m.cov_weight is None and sorted(n for n, _ in m.named_parameters()) == ["bias", "mean_weight", "weight"]
    assert torch.isfinite(m(torch.randn(4, 8, 3, 3))).all()
    with pytest.raises(ValueError, match="components"):
        en.SwitchableWhitening(8, components=("bw", "gw"))
    with pytest.raises(ValueError, match="components"):
        en.SwitchableWhitening(8, components=())
    with pytest.raises(en.InputError, match="1 value per channel"):
        en.SwitchableWhitening(8)(torch.randn(1, 8))


def test_fewer_samples_than_channels_stays_finite():
    x = torch.randn(4, 32, 1, 1, requires_grad=True)
    y = en.SwitchableWhitening(32, group_size=32)(x)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_autocast_keeps_statistics_in_float32():
    conv = torch.nn.Conv2d(8, 8, 1)
    m = en.SwitchableWhitening(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(torch.randn(8, 8, 5, 5))
        y = m(h)
    assert y.dtype == torch.bfloat16 and m.running_cov.dtype == torch.float32
    torch.testing.assert_close(y.float(), en.SwitchableWhitening(8)(h.float()), atol=0.03, rtol=0.02)
