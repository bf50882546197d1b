"""The lean training step of PIT and the ZCA family (``_fast_train_step``): once a module is
set up, a CPU training step skips the full forward's Python and calls the C++ step directly.
It must give exactly what the full path gives, be the path actually taken, and leave every
input the full path would reject (or handle otherwise) to the full path."""

import pytest
import torch

import exoticnorm as en
from exoticnorm.base import Norm
from exoticnorm.kernels import pit_cpu, whiten_cpu

LEAN = [  # (norm, options, input shape) the lean step takes
    ("pit", {}, (16, 4, 5, 5)),
    ("pit", {"momentum": None, "output": "uniform"}, (32, 4)),
    ("zca", {}, (16, 4, 5, 5)),
    ("zca", {}, (64, 4)),
    ("zca", {"shrinkage": "lw"}, (12, 4)),  # (N, C) with Ledoit–Wolf's ρ: the C++ step computes it
    ("block-zca", {"group_size": 3, "momentum": None}, (64, 7)),  # a short last group
    ("block-zca", {"group_size": 2}, (16, 4, 3, 3)),
    ("sparse-zca", {"density": 0.5}, (16, 4, 5, 5)),
]
FULL = [  # the full path's own choices, which the lean checks must leave to it
    ("block-zca", {"group_size": 3}, (16, 7, 3, 3)),  # spatial with a short last group: torch ops
    ("zca", {}, (16, 4, 2, 2)),  # 4 positions: torch ops
    ("zca", {}, (2, 8, 2, 4)),  # 16 samples < 4c: Ledoit–Wolf's ρ, which needs the centred samples
]


def _kernels_built(name):
    return (pit_cpu() if name == "pit" else whiten_cpu()) is not None


def _steps(m, xs, dtype):
    out = []
    for x in xs:
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        m.zero_grad()
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y))
        out.append((y.detach(), xi.grad, m.weight.grad.clone(), m.bias.grad.clone(),
                    *(t.clone() for t in m.buffers())))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,options,shape", LEAN + FULL)
def test_lean_step_equals_the_full_forward(name, options, shape, dtype):
    """Three training steps, lean against full (``_lean = False``): outputs, the gradients of x,
    γ and β, and every buffer (running statistics, sketch, num_batches_tracked) bit for bit."""
    if not _kernels_built(name):
        pytest.skip("no C++ compiler: the kernels are not built")
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape, generator=gen, dtype=dtype) * (1 + i) + i for i in range(3)]
    results = []
    for lean in (True, False):
        torch.manual_seed(0)
        m = en.create_norm(name, shape[1], **options).to(dtype)
        with torch.no_grad():
            m.weight.uniform_(0.5, 2), m.bias.uniform_(-1, 1)
        m._lean = lean
        results.append(_steps(m, xs, dtype))
    for lean_step, full_step in zip(*results):
        assert len(lean_step) == len(full_step)
        for a, b in zip(lean_step, full_step):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert int(m.num_batches_tracked) == 3


@pytest.mark.parametrize("name,options,shape", LEAN + FULL)
def test_lean_step_is_taken_and_bad_input_still_gets_the_full_forward(name, options, shape, monkeypatch):
    """After the first step (which sets up PIT's grids on the full path), training steps in the
    lean cases skip the full forward (whose first act is ``check_input``; in the other cases they
    do not skip it); inputs the lean checks do not pass get its errors, and change nothing."""
    if not _kernels_built(name):
        pytest.skip("no C++ compiler: the kernels are not built")
    calls = []
    full = Norm.check_input
    monkeypatch.setattr(Norm, "check_input", lambda self, x: (calls.append(1), full(self, x))[1])
    m = en.create_norm(name, shape[1], **options)
    x = torch.randn(shape)
    lean = (name, options, shape) in LEAN
    setup = 1 if name == "pit" or not lean else 0
    m(x)
    assert len(calls) == setup
    for _ in range(2):
        m(x).sum().backward()
    assert len(calls) == (setup if lean else 3) and int(m.num_batches_tracked) == 3
    state = {k: v.clone() for k, v in m.state_dict().items()}
    c = shape[1]
    bad = [(torch.randn(8, c + 1, *shape[2:]), en.InputError, f"built for {c} channels"),
           (torch.randn(1, c), en.InputError, "1 value per channel"),
           (torch.randn(c), en.InputError, "expects"),
           (torch.ones(8, c, dtype=torch.long), TypeError, "floating-point")]
    for xb, error, message in bad:
        with pytest.raises(error, match=message):
            m(xb)
    with pytest.raises(en.InputError, match="vmap"):
        torch.func.vmap(m)(torch.randn(2, *shape))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    # half precision goes the full way (statistics in float32), and is counted once
    calls.clear()
    y = m(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert len(calls) == 1 and int(m.num_batches_tracked) == 4


def test_subclasses_that_override_the_step_keep_the_full_forward():
    from exoticnorm.structured import MonarchZCANorm

    class Logged(en.PITNorm):
        def _train_transform(self, x):
            self.seen = True
            return super()._train_transform(x)

    class Plain(en.BlockZCANorm):
        pass

    assert en.PITNorm._lean and en.ZCANorm._lean and en.BlockZCANorm._lean and en.SparseZCANorm._lean
    assert Plain._lean and not en.BatchNorm._lean and not en.GroupWhitening._lean
    assert not MonarchZCANorm._lean and not Logged._lean
    m = Logged(3)
    for _ in range(2):
        m.seen = False
        m(torch.randn(8, 3, 4, 4))
        assert m.seen


def test_lean_step_in_other_settings_equals_the_full_forward():
    """Parameters in another dtype than x, channels_last input, inference mode and bf16 autocast:
    the lean step (or the full forward it leaves them to) gives what the full forward gives."""
    if pit_cpu() is None or whiten_cpu() is None:
        pytest.skip("no C++ compiler: the kernels are not built")
    settings = {
        "float32 module, float64 input": (torch.float64, lambda x: x, torch.enable_grad),
        "channels_last": (torch.float32, lambda x: x.contiguous(memory_format=torch.channels_last), torch.enable_grad),
        "inference_mode": (torch.float32, lambda x: x, torch.inference_mode),
        "autocast bf16": (torch.float32, lambda x: x, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    }
    for name in ("pit", "zca", "block-zca"):
        for label, (dtype, layout, context) in settings.items():
            gen = torch.Generator().manual_seed(1)
            xs = [layout(torch.randn(16, 4, 5, 5, generator=gen, dtype=dtype) + i) for i in range(3)]
            results = []
            for lean in (True, False):
                torch.manual_seed(0)
                m = en.create_norm(name, 4, **({"group_size": 2} if name == "block-zca" else {}))
                m._lean = lean
                with context():
                    ys = [m(x) for x in xs]
                results.append([y.detach().clone() for y in ys] + [t.clone() for t in m.buffers()])
            for a, b in zip(*results):
                assert a.dtype == b.dtype, (name, label)
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{name}, {label}")


def test_pit_sketch_loaded_as_strided_views_steps_as_a_dense_one():
    """load_state_dict(assign=True) of strided views leaves the sketch dense (the C++ step writes
    its buffers as dense arrays), and training then matches a module loaded the usual way."""
    if pit_cpu() is None:
        pytest.skip("no C++ compiler: the kernels are not built")
    source = en.PITNorm(3)
    for seed in range(2):
        source(torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(seed)))
    state = source.state_dict()
    strided = {k: torch.stack([v, v], -1)[..., 0] if v.ndim else v for k, v in state.items()}
    assert not strided["sketch.ready"].is_contiguous()
    a, b = en.PITNorm(3), en.PITNorm(3)
    a.load_state_dict(strided, assign=True)
    b.load_state_dict(state)
    assert all(t.is_contiguous() for t in a.sketch.buffers())
    x = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(9)) * 3 + 2  # moves the grids
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True, msg=k)
