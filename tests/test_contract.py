"""What every registered norm guarantees (README: "What every norm guarantees").

Parametrized by ``available_norms()`` at collection time: a norm registered later is tested
here without anyone writing a line. Per-norm options (``OPTIONS``) only where a default
cannot fit 8 channels.
"""

import copy
import io
import pickle
import re

import pytest
import torch
from torch import nn

import exoticnorm as en
from exoticnorm.precise import precise_statistics

C = 8
OPTIONS = {"block-zca": {"group_size": 4}}
NORMS = en.available_norms()
TWICE = re.compile("twice")  # the clear double-backward errors: ours and once_differentiable's


def make(name, **kw):
    return en.create_norm(name, C, **{**OPTIONS.get(name, {}), **kw})


def batch_stats(m):
    return getattr(m, "batch_statistics", False)


def shape_of(m, rank):
    if rank - 2 < getattr(m, "min_spatial_dims", 0):
        pytest.skip(f"{type(m).__name__} needs {m.min_spatial_dims} spatial dim(s) (a clear error, tested below)")
    return (16, C, *[3] * (rank - 2))


def trained(name, steps=3, shape=(16, C, 4, 4), **kw):
    """A norm after a few training batches (running statistics moved), in eval mode."""
    torch.manual_seed(1)
    m = make(name, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
        for i in range(steps):
            m(torch.randn(shape) * (1 + i) + i)
    return m.eval()


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_every_rank_train_and_eval(name, rank):
    m = make(name)
    shape = shape_of(m, rank)
    x = torch.randn(shape) * 2 + 1
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    m.eval()
    y = m(torch.randn(shape))
    assert y.shape == shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", [n for n in NORMS if en.create_norm(n, C, **OPTIONS.get(n, {})).min_spatial_dims])
def test_missing_spatial_dims_is_a_clear_error(name):
    with pytest.raises(en.InputError, match="spatial"):
        make(name)(torch.randn(16, C))


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("shape", [(16, C), (16, C, 3, 3)])
@pytest.mark.parametrize("op", ["relu_", "add_", "residual"])
@pytest.mark.parametrize("train", [True, False])
def test_inplace_ops_on_the_output(name, shape, op, train):
    """ReLU(inplace=True), ``out += identity``: as out of place, same gradients."""
    m = trained(name, shape=(16, C, 3, 3)).train(train) if len(shape) == 4 else make(name).train(train)
    if len(shape) - 2 < m.min_spatial_dims:
        pytest.skip("needs spatial dims")
    x0 = torch.randn(shape)

    def run(inplace):
        torch.manual_seed(0)
        mm = copy.deepcopy(m)
        x = x0.clone().requires_grad_()
        h = x * 1.5  # a non-leaf input, as inside a model
        y = mm(h)
        if op == "relu_":
            y = y.relu_() if inplace else y.relu()
        elif op == "add_":
            y = y.add_(1.0) if inplace else y + 1.0
        else:
            if inplace:
                y += h
            else:
                y = y + h
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = [x.grad] + [p.grad for p in mm.parameters()]
        return y.detach(), grads

    y1, g1 = run(True)
    y2, g2 = run(False)
    torch.testing.assert_close(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NORMS)
def test_gradcheck_and_double_backward(name):
    """float64 gradcheck; PIT's gradient is its forward's derivative only with smoothing=0 (or
    enough values per channel), so it is checked in that mode (tests/test_pit.py checks the
    smoothed one)."""
    torch.manual_seed(0)
    m0 = make(name, **({"smoothing": 0.0} if name == "pit" else {})).double()
    with torch.no_grad():
        m0(torch.randn(12, C, 3, dtype=torch.float64))  # a grid or running state to start from
    fn = lambda x: copy.deepcopy(m0)(x)  # noqa: E731  every call from the same state
    x = torch.randn(12, C, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,))
    try:
        ok = torch.autograd.gradgradcheck(fn, (x,))
    except RuntimeError as err:  # not twice differentiable: must say so, never be silently wrong
        assert TWICE.search(str(err)), f"unclear double-backward error: {err}"
    else:
        assert ok


@pytest.mark.parametrize("name", NORMS)
def test_state_dict_round_trip_assign_and_functional_call(name):
    a, b = trained(name), trained(name, steps=5)
    x = torch.randn(16, C, 4, 4)
    want = b(x)
    fresh = make(name).eval()
    fresh.load_state_dict(b.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), want)
    a(x)  # fills any eval cache with a's statistics
    state = {**dict(b.named_parameters()), **dict(b.named_buffers())}
    torch.testing.assert_close(torch.func.functional_call(a, state, (x,)), want)
    a.load_state_dict(copy.deepcopy(b.state_dict()), assign=True)
    torch.testing.assert_close(a(x), want)


@pytest.mark.parametrize("name", NORMS)
def test_deepcopy_and_pickle(name):
    m = trained(name)
    x = torch.randn(16, C, 4, 4)
    want = m(x)
    torch.testing.assert_close(copy.deepcopy(m)(x), want)
    torch.testing.assert_close(pickle.loads(pickle.dumps(m))(x), want)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = make(name).eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh(x), want)


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_module_dtypes(name, dtype):
    m = make(name).to(dtype)
    x = torch.randn(16, C, 4, 4).to(dtype)
    y = m(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    m.eval()
    y = m(x)
    assert y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("name", NORMS)
def test_bfloat16_autocast(name):
    model = nn.Sequential(nn.Conv2d(3, C, 3), make(name), nn.ReLU())
    x = torch.randn(16, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        y.float().sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("train", [True, False])
def test_channels_last_and_non_contiguous_input(name, train):
    m = trained(name).train(train)
    x = torch.randn(16, C, 5, 5)
    want = copy.deepcopy(m)(x)
    torch.testing.assert_close(copy.deepcopy(m)(x.to(memory_format=torch.channels_last)), want)
    wide = torch.randn(16, 2 * C, 5, 5)
    wide[:, ::2] = x
    torch.testing.assert_close(copy.deepcopy(m)(wide[:, ::2]), want)  # strided, non-contiguous


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("train", [True, False])
def test_zero_size_batch_gives_empty_output(name, train):
    m = make(name).train(train)
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(0, C, 4, 4, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on an empty batch"


@pytest.mark.parametrize("name", NORMS)
def test_batch_of_one_in_training(name):
    m = make(name)
    if batch_stats(m):
        with pytest.raises(en.InputError, match="1 value per channel in training"):
            m(torch.randn(1, C))
        m.eval()
        assert torch.isfinite(m(torch.randn(1, C))).all()
    elif not m.min_spatial_dims:
        assert torch.isfinite(m(torch.randn(1, C, 2, 2))).all()


@pytest.mark.parametrize("name", NORMS)
def test_inference_mode(name):
    with torch.inference_mode():
        m = make(name)
        m(torch.randn(16, C, 4, 4))
        m.eval()
        y = m(torch.randn(16, C, 4, 4))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NORMS)
def test_meta_device(name):
    m = make(name).to("meta")
    assert m(torch.empty(16, C, 4, 4, device="meta")).shape == (16, C, 4, 4)


@pytest.mark.parametrize("name", NORMS)
def test_torch_compile_matches_eager(name):
    """Forward and backward under torch.compile equal eager (graph breaks allowed)."""
    torch._dynamo.reset()
    base = nn.Sequential(nn.Conv2d(3, C, 3), make(name), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    base(torch.randn(2, 3, 6, 6))  # materialize the lazy layer
    x = torch.randn(16, 3, 6, 6)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        out = run(x)
        out.square().sum().backward()
        model.eval()
        results.append((out.detach(), [p.grad for p in model.parameters()], run(x).detach()))
    (y1, g1, e1), (y2, g2, e2) = results
    torch.testing.assert_close(y2, y1)
    torch.testing.assert_close(e2, e1)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("train", [True, False])
def test_vmap_works_or_says_why(name, train):
    m = trained(name).train(train)
    xs = torch.randn(3, 16, C, 4, 4)
    try:
        y = torch.func.vmap(m)(xs)
    except en.InputError as err:
        assert "vmap" in str(err)
        return
    want = torch.stack([copy.deepcopy(trained(name).train(train))(x) for x in xs]) if not train else None
    assert y.shape == xs.shape and torch.isfinite(y).all()
    if want is not None:
        torch.testing.assert_close(y, want)


@pytest.mark.parametrize("name", NORMS)
def test_convert_to_and_from(name):
    model = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 1), nn.BatchNorm2d(C))
    conv = en.convert_norms(copy.deepcopy(model), name, **OPTIONS.get(name, {}))
    types = [type(m) for m in conv.modules()]
    assert nn.BatchNorm2d not in types
    assert types.count(type(make(name))) == 2
    x = torch.randn(16, 3, 6, 6)
    assert torch.isfinite(conv(x)).all()
    back = en.convert_norms(conv, "bn")
    assert [type(m) for m in back.modules()].count(en.BatchNorm) == 2
    assert torch.isfinite(back(x)).all()


@pytest.mark.parametrize("name", NORMS)
def test_precise_statistics(name):
    model = nn.Sequential(nn.Conv2d(3, C, 3), make(name), nn.ReLU())
    batches = [torch.randn(16, 3, 6, 6) for _ in range(3)]
    for b in batches:
        model(b)
    n = precise_statistics(model, batches, only_flagged=False)
    norm = model[1]
    assert n == int(getattr(norm, "track_running_stats", False) and getattr(norm, "cumulative", True))
    model.eval()
    assert torch.isfinite(model(batches[0])).all()
