"""Every registered norm inside real torchvision models, and in-place ops right after a norm.

Each (norm, model) case converts every BatchNorm of a freshly built torchvision model (weights=None,
num_classes=10) to the norm, trains 10 steps on one fixed random batch with fixed random labels,
and checks: every loss finite, the loss falling (mean of the last 3 below the first), every
parameter and floating buffer (running statistics) finite, and in eval mode two forward passes
under no_grad finite and identical (torch.equal).

The norms come from ``en.available_norms()`` at collection time, so a norm registered later is
covered without touching this file. resnet18 × every norm is in the default suite; the other
models are ``slow`` (run them with ``pytest -m slow tests/test_real_models.py``).

In-place ops right after a norm (ReLU(inplace=True), ``out += identity``) are part of the
contract test (tests/test_contract.py).

Choices (measured on a 2-core CPU):
- Optimizer: Adam, lr 1e-3. SGD lr 0.01 momentum 0.9 makes torch's own nn.GroupNorm(32, C)
  oscillate in resnet18 over 10 steps (so does gn, identically), and an SGD lr low enough for that
  (1e-3) leaves mobilenet_v3_small's loss flat; Adam's step does not depend on the gradient's
  scale, which the norms change a lot. Except vgg11_bn: SGD lr 0.002 momentum 0.9 (see MODELS).
- Dropout and stochastic depth are off (dropout=0 etc.): they add noise to a 10-step loss and
  are not what is under test.
- Inputs 32×32 except where a norm needs more: mobilenet_v3_small, densenet121, efficientnet_b0
  and resnet18 reach 1×1 spatial maps at 32 px, fine for batch norms (the batch still gives
  B values per channel, which these cases check) but not for norms that normalize each sample
  over its spatial positions only (``in``): those get 64×64 (2×2 or more at the last norm).
  densenet121 (179 norms up to 1024 channels) and efficientnet_b0 (up to 1280) run 8 images.
- gn: num_groups = the largest divisor (at most 32) of the gcd of the model's channel counts.
"""

from __future__ import annotations

import math
from functools import reduce

import pytest
import torch
import torchvision
from torch import nn

import exoticnorm as en
from conftest import train_steps

NORMS = en.available_norms()  # at collection time: a norm registered later is covered

# Norms that normalize each sample over its spatial positions only: a 1×1 map leaves them one
# value per channel, which they rightly reject (InputError), so their model inputs are larger.
PER_SAMPLE_SPATIAL = {"in"}

STEPS = 10


def _build(name: str) -> nn.Module:
    models = torchvision.models
    if name == "resnet18":
        return models.resnet18(weights=None, num_classes=10)
    if name == "mobilenet_v3_small":
        return models.mobilenet_v3_small(weights=None, num_classes=10, dropout=0.0)
    if name == "vgg11_bn":
        return models.vgg11_bn(weights=None, num_classes=10, dropout=0.0)
    if name == "densenet121":
        return models.densenet121(weights=None, num_classes=10, memory_efficient=True)
    if name == "efficientnet_b0":
        return models.efficientnet_b0(weights=None, num_classes=10, dropout=0.0,
                                      stochastic_depth_prob=0.0)
    raise ValueError(name)


# model → (batch, side, side for PER_SAMPLE_SPATIAL norms, optimizer)
ADAM = ("adam", 1e-3)
MODELS = {
    "resnet18": (16, 32, 64, ADAM),
    "mobilenet_v3_small": (16, 32, 64, ADAM),
    # 2×2 at the last norm already. SGD: Adam moves every weight of the 25088→4096→4096→10
    # classifier by ~lr in the same direction, so logits jump by ~lr·fan-in (bn's loss went
    # 2.3 → 180 at 1e-3); SGD also halves the time (Adam's state for 129M parameters).
    "vgg11_bn": (16, 32, 32, ("sgd", 0.002)),
    "densenet121": (8, 32, 64, ADAM),
    "efficientnet_b0": (8, 32, 64, ADAM),
}
FAST_MODELS = {"resnet18"}
# sparse-zca re-selects its kept entries every step (a discontinuous top-k), which makes Adam at
# 1e-3 bounce in efficientnet_b0 (losses 2.5 → 0.9 → 4.3 over 10 steps); at 3e-4 it falls.
OPTIMIZER_OVERRIDES = {("efficientnet_b0", "sparse-zca"): ("adam", 3e-4)}


def _optimizer(model: nn.Module, kind: str, lr: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def _options(norm: str, model: nn.Module) -> dict:
    """Per-norm options, only where a norm's default would not fit every layer of ``model``."""
    if norm == "gn":
        channels = [m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        g = reduce(math.gcd, channels)
        return {"num_groups": max(d for d in range(1, 33) if g % d == 0)}
    return {}


def _cases():
    for model in MODELS:
        marks = () if model in FAST_MODELS else (pytest.mark.slow,)
        for norm in NORMS:
            yield pytest.param(model, norm, marks=marks, id=f"{model}-{norm}")


def _floating_state(model: nn.Module):
    yield from (("parameter", n, t) for n, t in model.named_parameters())
    yield from (("buffer", n, t) for n, t in model.named_buffers() if t.is_floating_point())


@pytest.mark.parametrize("model_name, norm", list(_cases()))
def test_norm_trains_in_real_model(model_name, norm):
    torch.manual_seed(0)
    model = _build(model_name)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model = en.convert_norms(model, norm, **_options(norm, model))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()), \
        "convert_norms left a torch BatchNorm"
    assert n_bn > 0

    batch, side, spatial_side, (kind, lr) = MODELS[model_name]
    kind, lr = OPTIMIZER_OVERRIDES.get((model_name, norm), (kind, lr))
    side = spatial_side if norm in PER_SAMPLE_SPATIAL else side
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, side, side, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)

    opt = _optimizer(model, kind, lr)
    model.train()
    losses = train_steps(model, x, y, opt, STEPS)
    shown = " ".join(f"{v:.3g}" for v in losses)
    assert all(math.isfinite(v) for v in losses), f"non-finite loss: {shown}"
    assert sum(losses[-3:]) / 3 < losses[0], f"loss did not fall: {shown}"

    bad = [f"{kind} {name}" for kind, name, t in _floating_state(model) if not torch.isfinite(t).all()]
    assert not bad, f"non-finite after training: {', '.join(bad[:8])}" + (" ..." if len(bad) > 8 else "")

    model.eval()
    with torch.no_grad():
        out1 = model(x)
        out2 = model(x)
    assert torch.isfinite(out1).all(), f"eval output not finite ({(~torch.isfinite(out1)).sum()} values)"
    assert torch.equal(out1, out2), \
        f"eval not deterministic: max |Δ| = {(out1 - out2).abs().max().item():.3g}"
