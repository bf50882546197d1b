"""The small residual network for 1×28×28 inputs (exoticnorm.models.ResNet)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import exoticnorm as en
from exoticnorm.models import ResNet
from test_contract import OPTIONS  # per-norm options where a default does not fit 8 channels

NORMS = en.available_norms()  # at collection time: a norm registered later is covered
WIDTHS = (8, 16, 32)


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _n_convs(blocks):
    return 1 + 3 * 2 * blocks + 2  # stem, two per block, the 1×1 shortcuts of stages 2 and 3


@pytest.mark.parametrize("n", [2, 5])
def test_output_shape(n):
    assert ResNet()(torch.randn(n, 1, 28, 28)).shape == (n, 10)


def test_parameter_count_width8_one_block_per_stage():
    # (in, out, kernel) of every conv, from the architecture: stem, s1b1, s2b1 (+ 1×1), s3b1 (+ 1×1)
    convs = [(1, 8, 3),
             (8, 8, 3), (8, 8, 3),
             (8, 16, 3), (16, 16, 3), (8, 16, 1),
             (16, 32, 3), (32, 32, 3), (16, 32, 1)]
    conv_params = sum(i * o * k * k + o for i, o, k in convs)  # weights + bias (bias=True)
    bn_params = sum(2 * o for _, o, _ in convs)  # γ and β after every conv
    fc_params = 32 * 10 + 10
    model = ResNet(width=8, blocks_per_stage=1)
    assert sum(p.numel() for p in model.parameters()) == conv_params + bn_params + fc_params
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in _convs(model)] == convs


def _reference(model, x, blocks, running):
    """The architecture written out with torch.nn.functional (F.batch_norm in training mode),
    reading only the weights from ``model``: strides, paddings, shortcuts and norm placement are
    this function's. ``running``: site → (running_mean, running_var) clones, updated as torch does."""
    norms = model.norms()

    def conv_bn(unit, site, h, stride):
        c, bn = unit.conv, norms[site]
        h = F.conv2d(h, c.weight, c.bias, stride=stride, padding=c.weight.shape[-1] // 2)
        assert bn.momentum == 0.1
        return F.batch_norm(h, *running[site], bn.weight, bn.bias, training=True, momentum=0.1, eps=bn.eps)

    h = F.relu(conv_bn(model.stem, "stem", x, 1))
    for s in (1, 2, 3):
        for b in range(1, blocks + 1):
            name, stride = f"s{s}b{b}", (2 if s > 1 and b == 1 else 1)
            blk = getattr(model.blocks, name)
            out = F.relu(conv_bn(blk.unit1, f"{name}.1", h, stride))
            out = conv_bn(blk.unit2, f"{name}.2", out, 1)
            short = conv_bn(blk.down, f"{name}.down", h, stride) if stride == 2 else h
            h = F.relu(out + short)
    assert h.shape[-2:] == (7, 7)
    return F.linear(h.mean(dim=(2, 3)), model.fc.weight, model.fc.bias)


@pytest.mark.parametrize("blocks", [1, 3])
def test_bn_model_matches_torch_batch_norm_reference(blocks):
    torch.manual_seed(0)
    model = ResNet(norm="bn", blocks_per_stage=blocks)
    with torch.no_grad():  # γ, β away from 1, 0 so that a misplaced norm shows
        for norm in model.norms().values():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    running = {s: (m.running_mean.clone(), m.running_var.clone()) for s, m in model.norms().items()}
    x = torch.randn(6, 1, 28, 28)
    y = model(x)
    with torch.no_grad():
        expected = _reference(model, x, blocks, running)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    for site, norm in model.norms().items():  # running statistics as torch's
        torch.testing.assert_close(norm.running_mean, running[site][0])
        torch.testing.assert_close(norm.running_var, running[site][1])


@pytest.mark.parametrize("blocks", [1, 3])
def test_a_norm_follows_every_conv_in_forward_order(blocks):
    model = ResNet(norm="bn", blocks_per_stage=blocks)
    calls = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, en.Norm)):
            m.register_forward_hook(lambda mod, inp, out: calls.append((mod, out.shape[1])))
    model(torch.randn(2, 1, 28, 28))
    n = _n_convs(blocks)
    assert len(_convs(model)) == n and len(model.norms()) == n == len(model.norm_sites)
    assert sum(isinstance(m, en.BatchNorm) for m in model.modules()) == n
    assert len(calls) == 2 * n
    for (conv, c1), (norm, c2) in zip(calls[::2], calls[1::2]):
        assert isinstance(conv, nn.Conv2d) and isinstance(norm, en.BatchNorm)
        assert c1 == c2 == norm.num_features
    assert list(model.norms().values()) == [m for m, _ in calls[1::2]]  # norm_sites in forward order
    assert model.norm_sites[:4] == ("stem", "s1b1.1", "s1b1.2", "s2b1.1" if blocks == 1 else "s1b2.1")
    assert "s2b1.down" in model.norm_sites and "s3b1.down" in model.norm_sites
    assert not any(s.endswith(".down") and not s.startswith(("s2b1", "s3b1")) for s in model.norm_sites)


def test_bn_folds_completely():
    """Every norm directly follows its conv (fx trace); folded eval output is the same."""
    torch.manual_seed(0)
    model = ResNet(norm="bn")
    for _ in range(2):
        model(torch.randn(8, 1, 28, 28))
    model.eval()
    folded, left = en.fold_norms(model)
    assert left == []
    assert not any(isinstance(m, en.Norm) for m in folded.modules())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NORMS)
def test_every_norm_trains_and_evaluates(name):
    torch.manual_seed(0)
    model = ResNet(norm=name, norm_kwargs=OPTIONS.get(name), width=8)
    kinds = {type(en.create_norm(name, c, **OPTIONS.get(name, {}))) for c in WIDTHS}
    assert {type(m) for m in model.norms().values()} == kinds and len(model.norms()) == _n_convs(1)
    assert sorted({m.num_features for m in model.norms().values()}) == list(WIDTHS)
    reference = copy.deepcopy(model)  # the same model with out-of-place ReLUs
    for m in reference.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)

    def step(net):
        torch.manual_seed(2)  # norms with randomness (none today) see the same draws
        loss = F.cross_entropy(net.train()(x), y)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in net.named_parameters()}

    loss, grads = step(model)
    assert torch.isfinite(loss)
    for n, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), n
    assert all(grads[n].abs().sum() > 0 for n, _ in model.named_parameters() if n.endswith("conv.weight"))
    ref_loss, ref_grads = step(reference)  # in-place ReLUs change nothing
    torch.testing.assert_close(loss, ref_loss)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], msg=n)
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()


def test_norm_layers_none_has_no_norms():
    model = ResNet(norm_layers="none")
    assert model.norm_sites == () and model.norms() == {}
    assert not any(isinstance(m, (en.Norm, nn.modules.batchnorm._NormBase)) for m in model.modules())
    assert len(_convs(model)) == _n_convs(1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_norm_layers_list_of_sites():
    model = ResNet(norm_layers=["s3b1.down", "stem"])
    assert list(model.norms()) == ["stem", "s3b1.down"]  # forward order
    assert sum(isinstance(m, en.Norm) for m in model.modules()) == 2


@pytest.mark.parametrize("layers", ["conv", "fc", "first", "last", "middle"])
def test_bad_norm_layers(layers):
    with pytest.raises(ValueError, match=r"unknown norm_layers .*ResNet takes norm_layers 'all', 'none'"):
        ResNet(norm_layers=layers)


def test_other_bad_options():
    with pytest.raises(ValueError, match=r"unknown norm sites \['conv1'\].*s2b1.down"):
        ResNet(norm_layers=["stem", "conv1"])
    with pytest.raises(ValueError, match="unknown activation"):
        ResNet(activation="swish2")
    with pytest.raises(ValueError, match="dropout"):
        ResNet(dropout=1.0)
    with pytest.raises(en.NormConfigError, match="unknown norm"):
        ResNet(norm="nope")


@pytest.mark.parametrize("layers", ["all", ["stem", "s2b1.1", "s3b1.down"]])
def test_bias_off_only_where_a_norm_follows(layers):
    model = ResNet(norm_layers=layers, bias=False)
    normed = {id(m) for m in model.norms().values()}
    units = [m for m in model.modules() if isinstance(m, nn.Sequential) and hasattr(m, "conv")]
    assert len(units) == _n_convs(1)
    for unit in units:
        has_norm = hasattr(unit, "norm") and id(unit.norm) in normed
        assert (unit.conv.bias is None) == has_norm
    assert model.fc.bias is not None
    if layers == "all":
        n_with = sum(p.numel() for p in ResNet(bias=True).parameters())
        n_without = sum(p.numel() for p in model.parameters())
        assert n_with - n_without == 8 + 8 + 8 + 16 + 16 + 16 + 32 + 32 + 32


def test_dropout_activation_and_norm_kwargs():
    model = ResNet(dropout=0.5)
    assert isinstance(model.drop, nn.Dropout) and model.drop.p == 0.5
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 1
    assert not any(isinstance(m, nn.Dropout) for m in ResNet().modules())
    relus = [m for m in ResNet().modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 3 and all(m.inplace for m in relus)
    gelu = ResNet(activation="gelu")
    assert sum(isinstance(m, nn.GELU) for m in gelu.modules()) == 7
    assert not any(isinstance(m, nn.ReLU) for m in gelu.modules())
    gn = ResNet(norm="gn", norm_kwargs={"num_groups": 4, "eps": 1e-3})
    assert all(m.num_groups == 4 and m.eps == 1e-3 for m in gn.norms().values())


def test_resnet20_shape():
    model = ResNet(blocks_per_stage=3, width=16)
    assert len(_convs(model)) == 21 and model.fc.in_features == 64
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
