"""Precise eval statistics: recomputed with the current weights, only for flagged norms."""

import copy

import pytest
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


class _Reversed(nn.Module):
    """Two norms registered in the opposite order to the one forward calls them in, and one
    that forward never calls."""

    def __init__(self):
        super().__init__()
        f64 = {"dtype": torch.float64}
        self.late, self.unused = en.BatchNorm(4, momentum=0.3, **f64), en.BatchNorm(4, momentum=0.2, **f64)
        self.fc1 = nn.Linear(5, 6, **f64)
        self.early = en.BatchNorm(6, momentum=0.1, **f64)
        self.fc2 = nn.Linear(6, 4, **f64)

    def forward(self, x):
        return self.late(self.fc2(torch.sigmoid(self.early(self.fc1(x)))))


def _moments(h):  # cumulative average of per-batch means and unbiased variances
    return torch.stack([b.mean(0) for b in h]).mean(0), torch.stack([b.var(0) for b in h]).mean(0)


def test_sequential_statistics_describe_the_eval_inputs_in_forward_order():
    torch.manual_seed(0)
    model = _Reversed()
    with torch.no_grad():
        model.early.weight.uniform_(0.5, 2.0), model.early.bias.uniform_(-1, 1)
    one_pass = copy.deepcopy(model)
    unused = model.unused.running_mean.clone()
    batches = [torch.randn(16, 5, dtype=torch.float64) * 3 + 1 for _ in range(3)]
    model.train()
    assert precise_statistics(model, batches, only_flagged=False, sequential=True) == 2
    assert precise_statistics(one_pass, batches, only_flagged=False) == 3

    with torch.no_grad():
        h1 = [model.fc1(b) for b in batches]
        mean1, var1 = _moments(h1)
        early = lambda h: (h - mean1) / torch.sqrt(var1 + model.early.eps) * model.early.weight + model.early.bias
        h2 = [model.fc2(torch.sigmoid(early(h))) for h in h1]  # `early` in eval, as `late` will see
        h2_train = [model.fc2(torch.sigmoid(torch.nn.functional.batch_norm(
            h, None, None, model.early.weight, model.early.bias, True, 0.0, model.early.eps))) for h in h1]
    for got, want in ((model.early.running_mean, mean1), (model.early.running_var, var1),
                      ((model.late.running_mean, model.late.running_var), _moments(h2)),
                      ((one_pass.late.running_mean, one_pass.late.running_var), _moments(h2_train))):
        torch.testing.assert_close(got, want)
    # the two modes differ for the second norm: one pass sees the training transform before it
    assert not torch.allclose(one_pass.late.running_mean, model.late.running_mean, atol=1e-3)
    assert torch.equal(model.unused.running_mean, unused)
    assert model.training and (model.early.momentum, model.late.momentum, model.unused.momentum) == (0.1, 0.3, 0.2)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = en.BatchNorm(3, dtype=torch.float64)

    def forward(self, x):
        return self.norm(self.norm(x) * 2 + 1)


def test_sequential_counts_every_call_of_a_norm_used_twice():
    batches = [torch.randn(8, 3, dtype=torch.float64) for _ in range(2)]
    a, b = _Twice(), _Twice()
    precise_statistics(a, batches, only_flagged=False)
    precise_statistics(b, batches, only_flagged=False, sequential=True)
    torch.testing.assert_close(b.norm.running_mean, a.norm.running_mean)
    assert int(b.norm.num_batches_tracked) == 4


class _Bypass(nn.Module):
    """Calls its norm's forward directly, so no hook sees it."""

    def __init__(self):
        super().__init__()
        self.norm = en.BatchNorm(3)

    def forward(self, x):
        return self.norm.forward(x)


def test_sequential_without_hooks_firing_is_an_error_that_says_what_to_do():
    model = _Bypass()
    before = model.norm.running_var.clone()
    with pytest.raises(RuntimeError, match="called none of the model's 1 norms.*sequential=False"):
        precise_statistics(model, [torch.randn(8, 3)], only_flagged=False, sequential=True)
    assert torch.equal(model.norm.running_var, before) and model.training


def test_sequential_matches_one_pass_for_a_single_norm():
    torch.manual_seed(1)
    a = nn.Sequential(nn.Linear(3, 4), en.ZCANorm(4, shrinkage=0.0)).eval()
    b = copy.deepcopy(a)
    batches = [torch.randn(32, 3) for _ in range(3)]
    assert precise_statistics(a, batches) == precise_statistics(b, batches, sequential=True) == 1
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v)
    assert not a.training and not b.training
