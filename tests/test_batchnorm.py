"""exoticnorm.BatchNorm against torch.nn.BatchNorm1d/2d/3d, and its bad-input errors."""

import itertools

import pytest
import torch
from torch import nn

import exoticnorm as en

TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = [(16, 5), (8, 5, 7), (6, 5, 4, 3), (4, 5, 3, 2, 3)]
MODES = list(itertools.product([True, False], [True, False], [0.1, None]))


def _pair(shape, dtype, affine, track, momentum):
    kw = dict(eps=1e-5, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    ours, ref = en.BatchNorm(shape[1], **kw), TORCH_BN[len(shape)](shape[1], **kw)
    if affine:
        with torch.no_grad():
            for m in (ours, ref):
                m.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
                m.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
    return ours, ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine,track,momentum", MODES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_parity_with_torch(shape, affine, track, momentum, dtype, tol):
    ours, ref = _pair(shape, dtype, affine, track, momentum)
    for step in range(4):
        training = step < 3
        ours.train(training), ref.train(training)
        x = (torch.randn(shape, dtype=dtype) * (step + 1) + step).requires_grad_()
        g = torch.randn(shape, dtype=dtype)
        y, y_ref = ours(x), ref(x)
        torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
        params = [x] + ([ours.weight, ours.bias] if affine else [])
        params_ref = [x] + ([ref.weight, ref.bias] if affine else [])
        for a, r in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params_ref, g)):
            torch.testing.assert_close(a, r, atol=tol * 10, rtol=tol * 10)
        for name, buf in ref.named_buffers():
            torch.testing.assert_close(getattr(ours, name), buf, atol=tol, rtol=tol)
    assert ours.state_dict().keys() == ref.state_dict().keys()


def test_loads_torch_state_dict_and_old_versions():
    ref = nn.BatchNorm2d(4)
    ref(torch.randn(8, 4, 3, 3) * 2 + 1)
    ours = en.BatchNorm(4)
    ours.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    assert int(ours.num_batches_tracked) == 1
    old = ref.state_dict()
    del old["num_batches_tracked"]
    old._metadata = {"": {"version": None}}  # a state_dict from before versioning
    fresh = en.BatchNorm(4)
    fresh.load_state_dict(old)
    assert int(fresh.num_batches_tracked) == 0
    torch.testing.assert_close(fresh.running_var, ref.running_var)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        current = ref.state_dict()
        del current["num_batches_tracked"]
        en.BatchNorm(4).load_state_dict(current)  # a current-version dict must be complete


def test_state_dict_round_trip_and_version():
    bn = en.BatchNorm(3)
    bn(torch.randn(10, 3))
    sd = bn.state_dict()
    assert sd._metadata[""]["version"] == en.BatchNorm._version
    other = en.BatchNorm(3)
    other.load_state_dict(sd)
    for k, v in sd.items():
        torch.testing.assert_close(other.state_dict()[k], v)


def test_reset_and_repr():
    bn = en.BatchNorm(3, momentum=None)
    bn(torch.randn(10, 3) + 5)
    with torch.no_grad():
        bn.weight.fill_(3)
    bn.reset_running_stats()
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.weight, torch.full((3,), 3.0))
    bn.reset_parameters()
    assert torch.equal(bn.weight, torch.ones(3))
    assert repr(bn) == "BatchNorm(3, eps=1e-05, affine=True, momentum=None, track_running_stats=True)"


def test_factory_kwargs():
    bn = en.BatchNorm(3, dtype=torch.float64, device="cpu")
    assert bn.weight.dtype == torch.float64 and bn.running_var.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long


def test_autocast_bfloat16_stats_stay_float32():
    bn = en.BatchNorm(4)
    conv = nn.Conv2d(3, 4, 1)
    x = torch.randn(16, 3, 5, 5) * 10 + 50
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(conv(x))
    assert y.dtype == torch.bfloat16
    assert bn.running_mean.dtype == torch.float32
    ref = nn.BatchNorm2d(4)
    ref(conv(x))
    torch.testing.assert_close(bn.running_mean, ref.running_mean, atol=0.05, rtol=0.01)


@pytest.mark.parametrize("x,error,match", [
    (torch.randn(1, 4), en.InputError, "1 value per channel"),
    (torch.randn(1, 4, 1, 1), en.InputError, "1 value per channel"),
    (torch.randn(8), en.InputError, r"expects \(N, C\)"),
    (torch.randn(2, 4, 1, 1, 1, 1), en.InputError, r"expects \(N, C\)"),
    (torch.randn(8, 3, 5), en.InputError, "built for 4 channels"),
    (torch.ones(8, 4, dtype=torch.long), TypeError, "floating-point"),
])
def test_bad_input_errors(x, error, match):
    with pytest.raises(error, match=match):
        en.BatchNorm(4)(x)


def test_single_sample_is_fine_in_eval_and_with_spatial_dims():
    bn = en.BatchNorm(4)
    bn(torch.randn(1, 4, 3, 3))  # 9 values per channel: allowed in training, as in torch
    bn.eval()
    assert bn(torch.randn(1, 4)).shape == (1, 4)


def test_nonfinite_input_propagates_like_torch():
    ours, ref = en.BatchNorm(3), nn.BatchNorm1d(3)
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    y, y_ref = ours(x), ref(x)
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    assert torch.isnan(ours.running_mean[1]) and torch.isnan(ref.running_mean[1])


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_features"):
        en.BatchNorm(0)
    with pytest.raises(ValueError, match="momentum"):
        en.BatchNorm(3, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        en.BatchNorm(3, eps=-1.0)

