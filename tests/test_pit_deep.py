"""PIT in a deep net: a PIT-resnet18 trains 50 SGD steps without non-finite values (issue #10).

Before the smoothed training transform, 3 steps at lr 0.01 drove layer1's activations to ~1e18
and the sketch to NaN (max |grad| 3.9e11 over 50 steps, measured with smoothing=0)."""

import pytest
import torch

import exoticnorm as en

torchvision = pytest.importorskip("torchvision")


@pytest.mark.slow
@pytest.mark.parametrize("lr", [0.01, 0.1])
def test_pit_resnet18_trains_50_steps_finite(lr):
    torch.manual_seed(0)
    model = en.convert_norms(torchvision.models.resnet18(num_classes=10), "pit")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(50):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses.append(loss.item())
        opt.step()
    assert all(map(lambda v: v == v and abs(v) < float("inf"), losses))
    assert all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
