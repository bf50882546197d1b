"""Precise eval statistics: recomputed with the current weights, only for flagged norms."""

import torch
from torch import nn

import exoticnorm as en
from exoticnorm.precise import precise_statistics


def test_recomputes_flagged_norms_cumulatively_and_restores_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), en.ZCANorm(6, shrinkage=0.0), nn.Dropout(0.5),
                          nn.Linear(6, 4), en.BatchNorm(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):  # move the weights so the running averages lag
        model(torch.randn(64, 5)).pow(2).mean().backward()
        opt.step(), opt.zero_grad()
    bn_before = model[4].running_mean.clone()
    batches = [torch.randn(64, 5) for _ in range(4)]
    assert precise_statistics(model, batches) == 1
    with torch.no_grad():
        hs = [model[0](b) for b in batches]
    expected_cov = torch.stack([torch.cov(h.T) for h in hs]).mean(0)
    torch.testing.assert_close(model[1].running_cov[0], expected_cov, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model[1].running_mean, torch.stack([h.mean(0) for h in hs]).mean(0))
    assert torch.equal(model[4].running_mean, bn_before)  # BatchNorm is not flagged
    assert model[1].momentum == 0.1 and model.training and model[2].training
    assert int(model[1].num_batches_tracked) == 4


def test_pit_sketch_momentum_follows_and_nothing_flagged_is_a_no_op():
    pit = en.PITNorm(3, momentum=0.2)
    pit.momentum = None
    assert pit.sketch.momentum is None
    pit.momentum = 0.2
    model = nn.Sequential(nn.Linear(3, 3), pit)
    assert precise_statistics(model, [torch.randn(32, 3) for _ in range(3)]) == 1
    assert pit.sketch.momentum == 0.2 and torch.equal(pit.sketch.weight, torch.full((3,), 96.0))
    assert precise_statistics(nn.Sequential(nn.Linear(3, 3), en.BatchNorm(3)), [torch.randn(8, 3)]) == 0
