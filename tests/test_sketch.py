"""QuantileSketch: accuracy against the exact pooled ECDF, drift, merging, memory."""

import math

import pytest
import torch

import exoticnorm as en
from exoticnorm.sketch import QuantileSketch


def _batch(kind, n, gen):
    z = torch.randn(1, n, generator=gen, dtype=torch.float64)
    if kind == "normal":
        return z
    if kind == "bimodal":
        side = torch.rand(1, n, generator=gen, dtype=torch.float64) < 0.5
        return torch.where(side, 0.5 * z - 2, 0.5 * z + 2)
    return z.exp()  # lognormal


def _sup_distance_to_ecdf(sketch, pooled):
    """max |F_sketch − F_pooled| over the line: checked on both sides of every jump."""
    xs = torch.sort(pooled).values
    n = len(xs)
    f = sketch.cdf_at(xs[None].to(sketch.cdf.dtype))[0].double()
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    return max((f - ecdf).abs().max().item(), (f - (ecdf - 1 / n)).abs().max().item())


@pytest.mark.parametrize("kind", ["normal", "bimodal", "lognormal"])
def test_cumulative_sketch_within_1e3_of_pooled_ecdf(kind):
    gen = torch.Generator().manual_seed(1)
    sketch = QuantileSketch(1, bins=500, momentum=None)
    seen = []
    for _ in range(1500):
        x = _batch(kind, 256, gen)
        sketch.update(x.float())
        seen.append(x.float().double())
    assert _sup_distance_to_ecdf(sketch, torch.cat(seen, 1)[0]) <= 1e-3


def test_state_is_at_most_2kb_per_channel():
    sketch = QuantileSketch(8, bins=500)
    per_channel = sum(b.element_size() * b.numel() for b in sketch.buffers()) / 8
    assert per_channel <= 2048


def test_drift_tracks_the_final_distribution():
    gen = torch.Generator().manual_seed(2)
    sketch = QuantileSketch(1, bins=500, momentum=0.01)
    for t in range(3000):
        a = min(t / 2000, 1.0)
        sketch.update(torch.randn(1, 256, generator=gen) * (1 - 0.7 * a) + 3 * a)
    xs = torch.linspace(1.0, 5.0, 4001)
    truth = 0.5 * (1 + torch.erf((xs.double() - 3) / (0.3 * math.sqrt(2))))
    assert (sketch.cdf_at(xs[None])[0].double() - truth).abs().max() <= 0.01


def test_merge_on_a_shared_grid_is_exact():
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 300, generator=gen) * 2 + 1 for _ in range(6)]
    whole = QuantileSketch(4, bins=64)
    for b in batches:
        whole.update(b)
    first = QuantileSketch(4, bins=64)
    first.update(batches[0])
    second = first.empty_like()
    for b in batches[1:3]:
        first.update(b)
    for b in batches[3:]:
        second.update(b)
    first.merge(second)
    torch.testing.assert_close(first.cdf, whole.cdf, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(first.weight, whole.weight)


def test_quantile_inverts_cdf():
    gen = torch.Generator().manual_seed(4)
    sketch = QuantileSketch(2, bins=200)
    for _ in range(50):
        sketch.update(torch.randn(2, 512, generator=gen))
    p = torch.tensor([0.01, 0.25, 0.5, 0.75, 0.99])
    q = sketch.quantile(p)
    torch.testing.assert_close(sketch.cdf_at(q), p.expand(2, -1), atol=1e-4, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bins"):
        QuantileSketch(2, bins=1)
    with pytest.raises(ValueError, match="momentum"):
        QuantileSketch(2, momentum=0.0)


def test_nonfinite_values_are_left_out_and_counted():
    s = QuantileSketch(1)
    x = torch.randn(1, 256)
    x[0, 3] = float("nan")
    x[0, 4] = float("inf")
    s.update(x)
    assert torch.isfinite(s.center).all() and torch.isfinite(s.cdf).all()
    assert s.nonfinite.item() == 2 and s.weight.item() == 254
    before = {k: v.clone() for k, v in s.state_dict().items()}
    s.update(torch.full((1, 256), float("nan")))  # an all-NaN batch changes nothing but the count
    for k, v in s.state_dict().items():
        if k != "nonfinite":
            assert torch.equal(v, before[k]) or (v.isnan().all() and before[k].isnan().all()), k
    assert s.nonfinite.item() == 258


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_grid_readapts_when_the_scale_moves_by_orders_of_magnitude(momentum):
    """Cumulative mode: the pooled CDF of N(0, 1) (1 batch) and N(0, 1e12) (20 batches);
    with a momentum: close to N(0, 1e12) (0.9^20 of the old mass is left)."""
    torch.manual_seed(0)
    s = QuantileSketch(1, momentum=momentum)
    s.update(torch.randn(1, 4096))
    for _ in range(20):
        s.update(1e6 * torch.randn(1, 4096))
    q = torch.tensor([[-1e6, 0.0, 1e6]])
    phi = torch.tensor([0.158655, 0.5, 0.841345])
    if momentum is None:
        want = (20 * phi + torch.tensor([0.0, 0.5, 1.0])) / 21
        tol = 0.025  # the N(0, 1) mass, 1/21, shares one bin of the moved grid
    else:
        want, tol = phi, 0.03
    assert (s.cdf_at(q)[0] - want).abs().max() <= tol


def test_low_precision_modules_keep_float32_state():
    s = QuantileSketch(2).bfloat16()
    assert s.cdf.dtype == torch.float32
    s.update(torch.randn(2, 100))
    assert torch.allclose(s.cdf_at(torch.full((2, 1), 1e9)), torch.ones(2, 1))
    m = en.PITNorm(4).half()
    y = m(torch.randn(16, 4, 3).half())
    assert y.dtype == torch.float16 and m.sketch.cdf.dtype == torch.float32 and torch.isfinite(y).all()


def test_loads_a_version_1_state_dict_without_nonfinite():
    s = QuantileSketch(2)
    s.update(torch.randn(2, 64))
    state = s.state_dict()
    del state["nonfinite"]
    state._metadata[""]["version"] = 1
    fresh = QuantileSketch(2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.cdf, s.cdf) and fresh.nonfinite.sum() == 0


def test_cdf_at_an_atom_is_its_mid_rank():
    s = QuantileSketch(1)
    s.update(torch.full((1, 256), 3.0))  # was F(3−) = 0
    assert s.cdf_at(torch.tensor([[3.0]])).item() == pytest.approx(0.5)
    x = torch.relu(torch.randn(1, 4000, generator=torch.Generator().manual_seed(0)))
    s = QuantileSketch(1)
    s.update(x)
    zeros = (x == 0).double().mean().item()
    assert s.cdf_at(torch.zeros(1, 1)).item() == pytest.approx(zeros / 2, abs=1e-3)
    assert s.cdf_at(torch.full((1, 1), 1e-6)).item() == pytest.approx(zeros, abs=2e-3)


@pytest.mark.parametrize("output", ["normal", "uniform"])
def test_pit_train_and_eval_agree_on_relu_zeros(output):
    """Zeros after a ReLU used to map to ≈ −0.68 in training but −2.33…−0.03 in eval."""
    torch.manual_seed(0)
    m = en.PITNorm(3, output=output)
    x = torch.relu(torch.randn(256, 3, 6, 6))
    for _ in range(5):
        y = m(x).detach()
    m.eval()
    ev = m(x).detach()
    for c in range(3):
        zeros = x[:, c] == 0
        train_c, eval_c = y[:, c][zeros], ev[:, c][zeros]
        assert train_c.std() < 1e-6 and eval_c.std() < 1e-6  # one value for all ties
        assert (eval_c - train_c).abs().max() < 0.01
