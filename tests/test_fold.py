"""fold_norms: eval norms folded into the conv/linear before them, outputs unchanged."""

import copy

import pytest
import torch
from torch import nn

import exoticnorm as en
from exoticnorm.models.lenet import LeNet

FOLDABLE = ["bn", "bn-mean", "bn-var", "bn-frozen", "running-bn", "zca", "block-zca", "sparse-zca", "monarch-zca",
            "circulant-zca"]
TRANSFORMS = [("block-zca", {"group_size": 4, "transform": t}) for t in ("cholesky", "pca")]


def _trained(model, x, steps=3):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for i in range(steps):
            model(x * (1 + i))
    return model.eval()


@pytest.mark.parametrize("name,kwargs", [(n, {}) for n in FOLDABLE] + TRANSFORMS)
def test_lenet_folds_every_norm_and_keeps_its_outputs(name, kwargs):
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28)
    model = _trained(LeNet(norm=name, norm_kwargs=kwargs), x)
    folded, left = fold_norms_checked(model)
    assert left == []
    assert not any(hasattr(m, "check_input") for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-5)
    assert model.training is False and any(hasattr(m, "check_input") for m in model.modules())  # untouched


def fold_norms_checked(model):
    folded, left = en.fold_norms(model)
    assert folded is not model and not folded.training
    return folded, left


def test_resnet18_folds_through_the_traced_graph():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    model = _trained(en.convert_norms(torchvision.models.resnet18(num_classes=10), "zca"), x, 2)
    folded, left = en.fold_norms(model)
    assert left == []
    assert not any(isinstance(m, en.Norm) for m in folded.modules())  # all 20 folded
    assert sum(isinstance(m, nn.Identity) for m in folded.modules()) == 20
    # whitening's eval maps amplify rounding (outputs ~7e4 here): measured against the float64
    # model, the folded float32 model is as close as the unfolded one (both ~5e-6 relative)
    ref = copy.deepcopy(model).double()(x.double())
    scale = ref.abs().max()
    err_folded = (folded(x).double() - ref).abs().max() / scale
    err_model = (model(x).double() - ref).abs().max() / scale
    assert err_folded <= max(1e-5, 2 * err_model)


def test_what_cannot_fold_is_left_and_listed():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), en.BatchNorm(4),           # after an activation
        nn.Conv2d(4, 4, 3, groups=2), en.ZCANorm(4),              # dense map after a grouped conv
        nn.Conv2d(4, 4, 1), en.PITNorm(4),                        # not affine
        nn.Conv2d(4, 4, 1), en.ZCANorm(4, track_running_stats=False),  # no running statistics
        nn.Conv2d(4, 4, 1, groups=4), en.BatchNorm(4),            # diagonal: folds into depthwise
    )
    x = torch.randn(16, 3, 9, 9)
    model = _trained(model, x)
    folded, left = en.fold_norms(model)
    reasons = dict(left)
    assert set(reasons) == {"2", "4", "6", "8"}
    assert "not directly after" in reasons["2"] and "grouped" in reasons["4"]
    assert "not an affine map" in reasons["6"] and "running statistics" in reasons["8"]
    assert isinstance(folded[10], nn.Identity)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
