"""The two eval protocols every run records, and the per-step activation history."""

import json

import numpy as np
import pytest
import torch

import exoticnorm as en
from exoticnorm.activations import HIST_EDGES, ActivationRecorder, load_activations
from exoticnorm.models import LeNet
from exoticnorm.precise import precise_statistics
from exoticnorm.train import EVAL_KEYS, RunConfig, evaluate_both, train_run


def _trained_lenet(norm, steps=5, **kw):
    torch.manual_seed(0)
    net = LeNet(norm, **kw)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(steps):
        x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def test_running_protocol_is_plain_eval_and_buffers_are_restored():
    net = _trained_lenet("bn")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    net.eval()
    with torch.no_grad():
        logits = net(x)
    want_loss = torch.nn.functional.cross_entropy(logits, y).item()
    out = evaluate_both(net, [torch.randn(32, 1, 28, 28) for _ in range(3)], x, y)
    assert out["test_loss_running"] == pytest.approx(want_loss, rel=1e-6)
    assert out["test_acc_running"] == (logits.argmax(1) == y).float().mean().item()
    assert out["precise_norms"] == 4
    assert out["test_acc"] == out["test_acc_precise"] and out["test_loss"] == out["test_loss_precise"]
    assert out["test_loss_precise"] != pytest.approx(out["test_loss_running"], rel=1e-3)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_precise_protocol_uses_the_batch_statistics_of_the_final_weights():
    """One precise batch: each bn's statistics must be its input's mean and unbiased variance
    in a training-mode forward of that batch (float64 reference from hooks)."""
    net = _trained_lenet("bn")
    batch = torch.randn(48, 1, 28, 28)
    seen, stats = {}, {}
    hooks = [m.register_forward_hook(lambda m, i, o, s=s: seen.__setitem__(s, i[0].double()))
             for s, m in net.norms().items()]
    net.train()
    with torch.no_grad():
        net(batch)
    for h in hooks:
        h.remove()

    def grab(module, inputs, output):  # the statistics the eval forward uses
        stats[module] = (module.running_mean.clone(), module.running_var.clone())

    hooks = [m.register_forward_hook(grab) for m in net.norms().values()]
    evaluate_both(net, [batch], torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    for h in hooks:
        h.remove()
    for site, module in net.norms().items():
        x = seen[site]
        dims = [0, 2, 3] if x.dim() == 4 else [0]
        mean, var = stats[module][0], stats[module][1]
        # the last forward that hook saw was the precise eval (its statistics, before restoring)
        torch.testing.assert_close(mean.double(), x.mean(dims), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.double(), x.var(dims, unbiased=True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", ["gn", "ln", "none"])
def test_norms_without_statistics_get_one_number(norm):
    net = _trained_lenet(norm, **({"norm_kwargs": {"num_groups": 2}} if norm == "gn" else {}))
    out = evaluate_both(net, [torch.randn(32, 1, 28, 28)], torch.randn(16, 1, 28, 28),
                        torch.randint(0, 10, (16,)))
    assert out["precise_norms"] == 0
    assert out["test_acc_running"] == out["test_acc_precise"]
    assert out["test_loss_running"] == out["test_loss_precise"]


def test_no_precise_batches_means_the_running_protocol_only():
    net = _trained_lenet("zca")
    out = evaluate_both(net, [], torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    assert out["precise_norms"] == 0 and out["test_acc_precise"] == out["test_acc_running"]


def test_recorder_matches_direct_statistics_and_numpy_histograms():
    torch.manual_seed(1)
    net = LeNet("bn")
    rec = ActivationRecorder(net.norms(), steps_per_epoch=3, hist_every=2)
    outs = {s: [] for s in net.norm_sites}
    hooks = [m.register_forward_hook(lambda m, i, o, s=s: outs[s].append(o.detach().double()))
             for s, m in net.norms().items()]
    net.train()
    for step in range(3):
        rec.step = step
        net(torch.randn(16, 1, 28, 28) * (step + 1))
    rec.paused = True
    net(torch.randn(16, 1, 28, 28) + 100)  # a precise pass: not recorded
    summary = rec.end_epoch()
    for h in hooks:
        h.remove()
    state = rec.state()
    assert state["mean"].shape == (3, 4) and state["hist"].shape == (2, 4, len(HIST_EDGES) - 1)
    assert state["hist_step"].tolist() == [0, 2]
    edges = HIST_EDGES.double().numpy()
    for i, site in enumerate(net.norm_sites):
        ys = outs[site][:3]
        want_mean = [y.mean().item() for y in ys]
        want_std = [y.std().item() for y in ys]
        np.testing.assert_allclose(state["mean"][:, i], want_mean, atol=1e-5)
        np.testing.assert_allclose(state["std"][:, i], want_std, rtol=1e-4)
        assert summary[f"act/{site}/mean"] == pytest.approx(np.mean(want_mean), abs=1e-5)
        for row, step in enumerate([0, 2]):
            counts, _ = np.histogram(ys[step].numpy().ravel(), bins=np.clip(edges, -1e30, 1e30))
            np.testing.assert_allclose(state["hist"][row, i], counts / ys[step].numel(), atol=1e-6)


def test_run_files_carry_both_protocols_and_resume_keeps_the_activation_history(tmp_path, fake_data):
    config = RunConfig(norm="zca", epochs=2, batch_size=64, precise_stats=3, seed=2)
    kw = dict(data_dir=fake_data, device="cpu", download=False, echo=lambda s: None, wandb_mode="disabled")
    full = train_run(config, tmp_path / "full", **kw)
    for key in EVAL_KEYS:
        assert key in full
    lines = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(l["precise_norms"] == 4 for l in lines)
    part = tmp_path / "part"
    assert train_run(config, part, stop_after=1, **kw)["status"] == "stopped"
    resumed = train_run(config, part, resume=True, **kw)
    assert resumed["test_acc_running"] == full["test_acc_running"]
    assert resumed["test_acc_precise"] == full["test_acc_precise"]
    a, b = load_activations(tmp_path / "full" / "activations.pt"), load_activations(part / "activations.pt")
    steps = a["steps_per_epoch"]
    assert a["mean"].shape == (2 * steps, 4)
    for key in ("mean", "std", "hist", "hist_step"):
        torch.testing.assert_close(b[key], a[key])


def test_restore_without_a_saved_history_keeps_steps_aligned(tmp_path):
    rec = ActivationRecorder(LeNet("bn").norms(), steps_per_epoch=4, hist_every=2)
    rec.restore(tmp_path / "missing.pt", epochs=2)
    assert rec.history["mean"].shape == (8, 4) and rec.history["mean"].isnan().all()
    rec.end_epoch()  # epoch 3 (nothing recorded) lands at rows 8..11, its histograms at steps 8, 10
    assert rec.history["mean"].shape == (12, 4)
    assert rec.history["hist_step"].tolist() == [8, 10]


def test_no_precise_batches_leaves_the_statistics_alone():
    net = _trained_lenet("bn")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert precise_statistics(net, [], only_flagged=False) == 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resuming_a_run_recorded_under_the_old_protocol_is_refused(tmp_path, fake_data):
    config = RunConfig(norm="bn", epochs=2, batch_size=64, precise_stats=2)
    kw = dict(data_dir=fake_data, device="cpu", download=False, echo=lambda s: None, wandb_mode="disabled")
    run = tmp_path / "old"
    assert train_run(config, run, stop_after=1, **kw)["status"] == "stopped"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    old = [{k: v for k, v in l.items() if k not in EVAL_KEYS} for l in lines]  # as runs were before
    (run / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in old))
    with pytest.raises(en.train.RunError, match="old per-norm eval protocol"):
        train_run(config, run, resume=True, **kw)
    assert (run / "checkpoint.pt").is_file() and (run / "metrics.jsonl").read_text()  # nothing lost


def test_resnet_runs_with_relu_by_default():
    config = RunConfig(model="resnet8")
    assert config.activation == "relu" and RunConfig().activation == "sigmoid"
    with pytest.raises(en.train.RunError, match="all .* or none"):
        RunConfig(model="resnet8", norm_layers="fc")
