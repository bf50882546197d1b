"""PITNorm: uniform/normal outputs, gradients, ties, eval from the sketch, bad input."""

import pytest
import scipy.stats
import torch

import exoticnorm as en


def _data(kind, shape=(256, 1, 24, 24), seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=gen)
    if kind == "lognormal":
        return z.exp()
    if kind == "bimodal":
        return torch.where(torch.rand(shape, generator=gen) < 0.3, 0.5 * z - 3, z + 2)
    return 3 * z + 1


@pytest.mark.parametrize("kind", ["normal", "lognormal", "bimodal"])
@pytest.mark.parametrize("output,dist", [("uniform", "uniform"), ("normal", "norm")])
def test_train_output_matches_target_distribution(kind, output, dist):
    x = _data(kind)  # 147,456 values per channel
    y = en.PITNorm(1, output=output)(x).detach().flatten().double().numpy()
    assert scipy.stats.kstest(y, dist).statistic <= 0.01


@pytest.mark.parametrize("output", ["uniform", "normal"])
def test_gradcheck_float64(output):
    m = en.PITNorm(2, bins=8, output=output).double()
    m(torch.randn(40, 2, 3, dtype=torch.float64))  # sets the grid, as any earlier batch does
    x = torch.randn(40, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    grad = torch.autograd.grad(m(x).sum(), x)[0]
    assert (grad != 0).all()  # non-zero inside the data range


def test_ties_get_mid_ranks():
    m = en.PITNorm(1, output="uniform", bins=50)
    x = torch.relu(torch.linspace(-1, 1, 1000)).view(1000, 1)  # about half zeros
    y = m(x).detach().flatten()
    zeros = x.flatten() == 0
    share = zeros.float().mean().item()
    torch.testing.assert_close(y[zeros], torch.full_like(y[zeros], share / 2))
    assert (y[~zeros] > share - 2e-3).all()


def test_eval_follows_the_sketch_with_graded_tails():
    m = en.PITNorm(1, output="normal", momentum=None)
    for seed in range(5):
        m(_data("normal", (64, 1, 16, 16), seed))
    m.eval()
    x = _data("normal", (64, 1, 16, 16), 9)
    expected = torch.from_numpy(scipy.stats.norm.ppf(scipy.stats.norm.cdf(x.double().numpy(), 1, 3)))
    y = m(x)
    bulk = expected.abs() < 2.5  # the tails rest on few samples
    assert (y.double() - expected)[bulk].abs().max() < 0.05
    far = m(torch.tensor([-1e4, -1e2, -30.0, 30.0, 1e2, 1e4]).view(6, 1))
    assert torch.all(far[1:] > far[:-1])  # ordered, not clamped to one value
    assert far[0] < y.min() and far[-1] > y.max()


def test_state_dict_round_trip_and_cumulative_weight():
    m = en.PITNorm(3, momentum=None)
    for seed in range(3):
        m(_data("normal", (16, 3, 4, 4), seed))
    assert torch.equal(m.sketch.weight, torch.full((3,), 3 * 16 * 16.0))
    other = en.PITNorm(3, momentum=None)
    other.load_state_dict(m.state_dict())
    m.eval(), other.eval()
    x = _data("normal", (4, 3, 4, 4), 7)
    torch.testing.assert_close(other(x), m(x))


def test_bad_input_and_options():
    with pytest.raises(ValueError, match="output"):
        en.PITNorm(2, output="gaussian")
    with pytest.raises(ValueError, match="tail"):
        en.PITNorm(2, tail=0.7)
    with pytest.raises(en.InputError, match="1 value per channel"):
        en.PITNorm(2)(torch.randn(1, 2))


def test_registered_and_in_lenet():
    from exoticnorm.models import LeNet

    model = LeNet(norm="pit", norm_kwargs={"output": "uniform"})
    out = model(torch.rand(32, 1, 28, 28))
    out.sum().backward()
    assert out.shape == (32, 10) and torch.isfinite(model.net.conv1.weight.grad).all()
    assert type(en.convert_norms(torch.nn.BatchNorm2d(4), "pit")) is en.PITNorm


@pytest.fixture
def threads(request):
    """torch's thread count for one test (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("output", ["uniform", "normal"])
# (32, 3): fewer values than the 40 bins (outputs cached by count); (64, 3) more
@pytest.mark.parametrize("shape", [(32, 3), (64, 3), (16, 3, 20), (8, 3, 6, 5), (4, 3, 2, 3, 4)])
@pytest.mark.parametrize("threads", [1, 8], indirect=True)  # 8 > 3 channels: rows in blocks
def test_fused_kernel_matches_torch_ops(output, shape, threads, monkeypatch):
    """The C++ training transform against the pure-torch one (CUDA's path): outputs, gradients
    of x, γ and β, and the sketch, over three steps, with ReLU-style ties in some channels."""
    from exoticnorm.kernels import pit_cpu

    if pit_cpu() is None:
        pytest.skip("no C++ compiler: the kernel is not built")
    torch.manual_seed(1)
    # three steps, the later ones shifted and scaled: the grid follows and moves between them
    xs = [torch.relu(torch.randn(shape, dtype=torch.float64) * (1 + i) + 0.3 + 2 * i) for i in range(3)]
    for x in xs:  # channel 0 without ties (the kernel's two-table loops), the others with
        x[:, 0] = torch.randn_like(x[:, 0]) + 1
    # non-finite values are left out of the counts (the kernel counts them into bin 0, then takes them back)
    xs[1].view(xs[1].shape[0], 3, -1)[:3, :2, 0] = torch.tensor([float("nan"), float("-inf"), float("inf")]).unsqueeze(1)
    results = []
    for off in ("0", "1"):
        monkeypatch.setenv("EXOTICNORM_NO_KERNELS", off)
        torch.manual_seed(0)
        m = en.PITNorm(3, output=output, bins=40, momentum=0.5).double()
        with torch.no_grad():
            m.weight.uniform_(0.5, 2), m.bias.uniform_(-1, 1)
        steps = []
        for x in xs:
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
            m.zero_grad()
            y.backward(gy)
            steps.append((y.detach(), xi.grad, m.weight.grad.clone(), m.bias.grad.clone(),
                          m.num_batches_tracked.clone(), *(b.clone() for b in m.sketch.buffers())))
        results.append(steps)
    assert not torch.equal(results[0][0][-7], results[0][2][-7]), "the grid did not move: the test lost its point"
    for step_kernel, step_torch in zip(*results):
        for a, b in zip(step_kernel, step_torch):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True)  # NaN: no atom


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(45, 19), (64, 24), (8, 8), (7, 9)])
def test_kernel_step_takes_flat_input_as_channel_rows(shape, dtype, monkeypatch):
    """(N, C) input is transposed into one row per channel inside the C++ step (8×8 register
    blocks where they fit, element by element at the edges) and y and the gradient back: the same
    outputs and gradients as the torch path over two steps."""
    from exoticnorm.kernels import pit_cpu

    if pit_cpu() is None:
        pytest.skip("no C++ compiler: the kernel is not built")
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(shape, generator=gen, dtype=dtype) * (1 + i) + i for i in range(2)]
    results = []
    for off in ("0", "1"):
        monkeypatch.setenv("EXOTICNORM_NO_KERNELS", off)
        m = en.PITNorm(shape[1], bins=40, momentum=0.5).to(dtype)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 2, shape[1])), m.bias.copy_(torch.linspace(-1, 1, shape[1]))
        steps = []
        for x in xs:
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            m.zero_grad()
            y.backward(torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y))
            steps.append((y.detach(), xi.grad, m.weight.grad.clone(), m.bias.grad.clone()))
        results.append(steps)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for step_kernel, step_torch in zip(*results):
        for a, b in zip(step_kernel, step_torch):
            torch.testing.assert_close(a, b, **tol)


def test_kernel_tables_match_torch_ops_for_each_output_and_tail(monkeypatch):
    """The C++ step keeps Φ⁻¹(j / n) for a channel count n once computed (per n, output and
    tail): modules that differ only in output or tail, on batches of the same n in one process,
    each still match the torch path."""
    from exoticnorm.kernels import pit_cpu

    if pit_cpu() is None:
        pytest.skip("no C++ compiler: the kernel is not built")
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(64, 3, 10, generator=gen, dtype=torch.float64) + i for i in range(2)]
    for output, tail in [("normal", 1e-3), ("normal", 0.05), ("uniform", 1e-3), ("normal", 1e-3)]:
        ys = []
        for off in ("0", "1"):
            monkeypatch.setenv("EXOTICNORM_NO_KERNELS", off)
            m = en.PITNorm(3, output=output, tail=tail, bins=40).double()
            ys.append([m(x).detach() for x in xs])
        for a, b in zip(*ys):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_kernel_step_keeps_g_and_its_derivative_only_when_a_backward_can_follow():
    """The CPU step saves the transform g and dg/dx for the backward (two tensors of x's size;
    the backward then reads no tables) and nothing under no_grad, whose output is the same."""
    from exoticnorm.kernels import pit_cpu

    if pit_cpu() is None:
        pytest.skip("no C++ compiler: the kernel is not built")
    torch.manual_seed(0)
    x = torch.randn(16, 3, 5, 5)
    models = [en.PITNorm(3) for _ in range(2)]
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = models[0](x)
        with torch.no_grad():
            y_plain = models[1](x)
    activation = [s for s in saved if s == (16, 3, 25)]
    assert len(activation) == 2 and len(saved) == 3, saved  # g, dg/dx and the weight
    torch.testing.assert_close(y.detach(), y_plain, rtol=0, atol=0)
    y.backward(torch.ones_like(y))
    assert models[0].weight.grad is not None and torch.isfinite(models[0].weight.grad).all()


@pytest.mark.parametrize("kernels", ["0", "1"])
def test_output_stays_uniform_when_the_grid_moves(kernels, monkeypatch):
    """A batch far from the previous ones moves the sketch's grid (after it is counted); its
    own transform must still be its CDF, in float32 as in float64, on both paths."""
    monkeypatch.setenv("EXOTICNORM_NO_KERNELS", kernels)
    for dtype in (torch.float32, torch.float64):
        m = en.PITNorm(1, output="uniform", momentum=0.5).to(dtype)
        m(_data("normal", (64, 1, 16, 16), 1).to(dtype))
        center = m.sketch.center.clone()
        x = (_data("normal", (256, 1, 20, 20), 2) + 6.0).to(dtype)
        y = m(x).detach().flatten().double().numpy()
        assert not torch.equal(center, m.sketch.center)  # the grid did move
        assert scipy.stats.kstest(y, "uniform").statistic <= 0.01


@pytest.mark.parametrize("kernels", ["0", "1"])
def test_nonfinite_input_gives_nonfinite_output_not_a_crash(kernels, monkeypatch):
    monkeypatch.setenv("EXOTICNORM_NO_KERNELS", kernels)
    m = en.PITNorm(2)
    x = torch.randn(32, 2, 4, 4)
    x[0, 0, 0, 0], x[1, 1, 0, 0] = float("nan"), float("inf")
    y = m(x)  # NaN/Inf propagate (as in torch's BatchNorm); no index error, no crash
    assert torch.isnan(y[0, 0, 0, 0])
    m.eval()
    assert torch.isnan(m(x)[0, 0, 0, 0])


def test_gradient_stays_bounded_with_few_values_per_channel():
    """32 values of N(0, σ²) on 500 bins: the slope of Φ⁻¹(F) is 1/σ for normal data. Pieces of
    ~8 values keep the gradient within a few 1/σ (measured max 3.2/σ over these seeds); one
    piece per bin (smoothing=0, the old transform) gives spikes of 30-55/σ."""
    sigma = 0.006
    worst = {}
    for smoothing in (8.0, 0.0):
        g = 0.0
        for seed in range(20):
            torch.manual_seed(seed)
            x = (sigma * torch.randn(32, 1)).requires_grad_()
            en.PITNorm(1, smoothing=smoothing)(x).sum().backward()
            g = max(g, x.grad.abs().max().item())
        worst[smoothing] = g * sigma
    assert worst[8.0] <= 5.0
    assert worst[0.0] >= 20.0  # the test can tell the two designs apart


def test_smoothing_changes_only_the_gradient_and_only_for_sparse_channels():
    """The forward is exact for every n; the backward is the exact derivative when
    n ≥ smoothing·bins (4,096 ≥ 8·500 values) and a smoothed one below."""
    for shape, same_grad in (((64, 2, 8, 8), True), ((32, 2), False)):
        torch.manual_seed(0)
        x = torch.randn(shape, dtype=torch.float64)
        outs = []
        for smoothing in (8.0, 0.0):
            xi = x.clone().requires_grad_()
            y = en.PITNorm(2, smoothing=smoothing).double()(xi)
            y.backward(torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y))
            outs.append((y.detach(), xi.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0])
        assert torch.allclose(outs[0][1], outs[1][1]) == same_grad
