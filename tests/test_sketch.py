"""QuantileSketch: accuracy against the exact pooled ECDF, drift, merging, memory."""

import math

import pytest
import torch

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
