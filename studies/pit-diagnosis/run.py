"""Why does a PIT-LeNet train worse than a BN-LeNet? Per-step diagnostics, one script.

For bn and three PIT variants (normal output with the default smoothed gradient, normal with
the exact per-bin gradient ``smoothing=0``, uniform output), and bn and PIT-normal in the conv
layers only, it trains d2l's LeNet (SGD, lr 0.1,
batch 128, sigmoid, seed 0) for ``--epochs`` and records every step:

* the training loss;
* each weighted layer's gradient norm ‖∂L/∂W‖ (conv1, conv2, fc1, fc2, fc3);
* each norm's backward gain ‖∂L/∂x‖ / ‖∂L/∂y‖ (x its input, y its output);
* every ``--slope-every`` steps, the distribution of the transform's local slope ∂y_i/∂x_i:
  for PIT the slope its backward uses (a copy of the layer, backward of Σy), for bn γ/√(σ²+ε)
  per channel (its per-element slope without the batch-mean terms).

Writes ``studies/pit-diagnosis/README.md``, ``results.json`` and figures (PNG, PDF). Usage:

    .venv/bin/python studies/pit-diagnosis/run.py [--epochs 2] [--readme-only]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from exoticnorm.data import load_fashion_mnist  # noqa: E402
from exoticnorm.models import LeNet  # noqa: E402
from exoticnorm.train import evaluate_both  # noqa: E402

HERE = Path(__file__).parent
VARIANTS = {  # name → (norm, options, LeNet norm_layers)
    "bn": ("bn", {}, "all"),
    "pit-normal": ("pit", {"output": "normal"}, "all"),
    "pit-normal-exact": ("pit", {"output": "normal", "smoothing": 0}, "all"),
    "pit-uniform": ("pit", {"output": "uniform"}, "all"),
    "bn-conv-only": ("bn", {}, "conv"),  # where does PIT cost: in the conv or the fc layers?
    "pit-normal-conv-only": ("pit", {"output": "normal"}, "conv"),
}
LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")


def slopes(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-element local slope of the norm's training transform at input ``x``."""
    if norm.__class__.__name__ == "BatchNorm":
        dims = [0, 2, 3] if x.dim() == 4 else [0]
        var = x.var(dims, unbiased=False)
        gain = norm.weight.detach() / torch.sqrt(var + norm.eps)
        return gain.expand(x.shape[1]).clone()
    probe = copy.deepcopy(norm).train()
    probe._forward_hooks.clear()  # not the recording hooks of the original
    xd = x.detach().clone().requires_grad_(True)
    probe(xd).sum().backward()
    return xd.grad.flatten()


def batch_noise(norm: torch.nn.Module, x: torch.Tensor) -> float:
    """How much a sample's training output depends on the rest of its batch:
    RMS(y_full[:h] − y_half) / RMS(y_full[:h]), y_full from the whole batch, y_half from its first
    half h alone (bn: mean/var from h values instead of 2h; PIT: ranks among h instead of 2h)."""
    probe = copy.deepcopy(norm).train()
    probe._forward_hooks.clear()
    h = len(x) // 2
    with torch.no_grad():
        full, half = probe(x)[:h], probe(x[:h])
    return ((full - half).pow(2).mean() / full.pow(2).mean()).sqrt().item()


def train(name: str, data, epochs: int, lr: float, slope_every: int) -> dict:
    norm, opts, layers_with_norm = VARIANTS[name]
    torch.manual_seed(0)
    net = LeNet(norm, opts, norm_layers=layers_with_norm)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    norms = net.norms()
    layers = {s: getattr(net.net, s) for s in LAYERS}
    grads_in: dict[str, float] = {}
    grads_out: dict[str, float] = {}
    inputs: dict[str, torch.Tensor] = {}

    def fwd(site):
        def hook(module, args, output):
            if not (module.training and output.requires_grad):  # eval, precise passes
                return
            inputs[site] = args[0].detach()
            output.register_hook(lambda g: grads_out.__setitem__(site, g.norm().item()))
            args[0].register_hook(lambda g: grads_in.__setitem__(site, g.norm().item()))
        return hook

    # the norm's input needs a gradient for the input hook: it does (it comes from a layer)
    for s, m in norms.items():
        m.register_forward_hook(fwd(s))
    rec = {"loss": [], "acc": [], "grad": {l: [] for l in LAYERS}, "gain": {s: [] for s in norms},
           "slope_steps": [], "slope": {s: [] for s in norms}, "noise": {s: [] for s in norms}}
    n, bs = len(data.train_x), 128
    step = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            x, y = data.train_x[idx], data.train_y[idx]
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            if step % slope_every == 0:
                rec["slope_steps"].append(step)
                for s, m in norms.items():
                    q = torch.quantile(slopes(m, inputs[s]).float()[:100_000],
                                       torch.tensor([0.1, 0.5, 0.9]))
                    rec["slope"][s].append(q.tolist())
                    rec["noise"][s].append(batch_noise(m, inputs[s]))
            opt.step()
            rec["loss"].append(loss.item())
            rec["acc"].append((logits.argmax(1) == y).float().mean().item())
            for l, m in layers.items():
                rec["grad"][l].append(m.weight.grad.norm().item())
            for s in norms:
                rec["gain"][s].append(grads_in[s] / max(grads_out[s], 1e-30))
            step += 1
    rows = [order[j * bs:(j + 1) * bs] for j in range(100)]
    rec["eval"] = evaluate_both(net, (data.train_x[r] for r in rows), data.test_x, data.test_y)
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _smooth(v, k=25):
    return [statistics.fmean(v[max(0, i - k + 1):i + 1]) for i in range(len(v))]


def figures(results: dict, out: Path) -> list[str]:
    names = []

    def save(fig, name):
        for ext in ("png", "pdf"):
            fig.savefig(out / f"{name}.{ext}", dpi=110, bbox_inches="tight")
        plt.close(fig)
        names.append(f"{name}.png")

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for v, r in results.items():
        ax[0].plot(_smooth(r["loss"]), label=v)
        ax[1].plot(_smooth(r["acc"]), label=v)
    ax[0].set(xlabel="step", ylabel="train loss (25-step mean)")
    ax[1].set(xlabel="step", ylabel="train accuracy (25-step mean)")
    ax[0].legend()
    save(fig, "loss")

    fig, axes = plt.subplots(1, len(LAYERS), figsize=(3.2 * len(LAYERS), 3), sharey=True)
    for ax, l in zip(axes, LAYERS):
        for v, r in results.items():
            ax.plot(_smooth(r["grad"][l]), label=v)
        ax.set(title=l, xlabel="step", yscale="log")
    axes[0].set_ylabel("‖∂L/∂W‖ (25-step mean)")
    axes[0].legend(fontsize=7)
    save(fig, "grad_norms")

    sites = list(next(iter(results.values()))["gain"])
    fig, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3), sharey=True)
    for ax, s in zip(axes, sites):
        for v, r in results.items():
            if s in r["gain"]:
                ax.plot(_smooth(r["gain"][s]), label=v)
        ax.set(title=f"norm after {s}", xlabel="step", yscale="log")
    axes[0].set_ylabel("‖∂L/∂x‖ / ‖∂L/∂y‖")
    axes[0].legend(fontsize=7)
    save(fig, "backward_gain")

    fig, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3), sharey=True)
    for ax, s in zip(axes, sites):
        for v, r in results.items():
            if s not in r["slope"]:
                continue
            q = list(zip(*r["slope"][s]))
            ax.plot(r["slope_steps"], q[1], label=v)
            ax.fill_between(r["slope_steps"], q[0], q[2], alpha=0.2)
        ax.set(title=f"norm after {s}", xlabel="step", yscale="log")
    axes[0].set_ylabel("local slope ∂y/∂x: median, 10–90%")
    axes[0].legend(fontsize=7)
    save(fig, "slopes")
    return names


def summary(results: dict) -> dict:
    out = {}
    for v, r in results.items():
        last = slice(-100, None)  # the last 100 steps
        out[v] = {
            "train_loss_last100": statistics.fmean(r["loss"][last]),
            "train_acc_last100": statistics.fmean(r["acc"][last]),
            "test_acc_running": r["eval"]["test_acc_running"],
            "test_acc_precise": r["eval"]["test_acc_precise"],
            "grad_norm_median": {l: statistics.median(r["grad"][l]) for l in LAYERS},
            "gain_median": {s: statistics.median(g) for s, g in r["gain"].items()},
            "slope_median_last": {s: q[-1][1] for s, q in r["slope"].items()},
            "batch_noise_median": {s: statistics.median(q) for s, q in r["noise"].items()},
            "seconds": r["seconds"],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--slope-every", type=int, default=25)
    ap.add_argument("--limit-train", type=int, help="the first N training images only (a smoke run)")
    ap.add_argument("--readme-only", action="store_true",
                    help="rewrite README.md from results.json and the figures already there")
    args = ap.parse_args()
    if args.readme_only:
        saved = json.loads((HERE / "results.json").read_text())
        args.epochs, args.lr = saved["epochs"], saved["lr"]
        figs = [f"{n}.png" for n in ("loss", "grad_norms", "backward_gain", "slopes")]
        write_readme(saved["summary"], figs, args, saved["train_images"])
        return
    torch.set_flush_denormal(True)
    data = load_fashion_mnist(download=False, limit_train=args.limit_train)
    results = {v: train(v, data, args.epochs, args.lr, args.slope_every) for v in VARIANTS}
    figs = figures(results, HERE)
    s = summary(results)
    (HERE / "results.json").write_text(json.dumps(
        {"epochs": args.epochs, "lr": args.lr, "torch": torch.__version__, "train_images": len(data.train_x),
         "summary": s,
         "per_step": {v: {k: r[k] for k in ("loss", "grad", "gain")} for v, r in results.items()}},
        indent=1) + "\n")
    write_readme(s, figs, args, len(data.train_x))


def _ratio(s, v, key, site):
    return s[v][key][site] / s["bn"][key][site]


def _cells(row: dict, sites) -> str:
    """A variant's values at ``sites`` (– where it has no norm)."""
    return " | ".join(f"{row[k]:.3g}" if k in row else "–" for k in sites)


def reading(s: dict) -> list[str]:
    """What the tables say, every number taken from them."""
    pit, bn, sites = s["pit-normal"], s["bn"], list(s["bn"]["gain_median"])
    grad = [_ratio(s, "pit-normal", "grad_norm_median", l) for l in LAYERS]
    slope = [bn["slope_median_last"][k] / pit["slope_median_last"][k] for k in sites]
    noise = [pit["batch_noise_median"][k] / bn["batch_noise_median"][k] for k in sites]
    gap_all = bn["train_acc_last100"] - pit["train_acc_last100"]
    gap_conv = s["bn-conv-only"]["train_acc_last100"] - s["pit-normal-conv-only"]["train_acc_last100"]
    return [
        "## What limits it",
        "",
        f"- **Not vanishing or exploding gradients.** PIT-normal's weight-gradient norms are "
        f"{min(grad):.2g}–{max(grad):.2g}× bn's in every layer.",
        f"- **A transform that flattens as training goes on.** bn's local slope is γ/σ per channel "
        "and stays level; PIT's median slope starts at bn's level and falls in every layer (figure "
        f"`slopes`), ending {min(slope):.2g}–{max(slope):.2g}× below bn's (after conv1 its 10–90% band "
        "spans orders of magnitude). A falling slope means the norm's input spreads out while its "
        "output does not, which for a scale-invariant layer lowers the effective step of the weights "
        "below it; that fits the learning rate helping (next points), but the weight norms were not "
        "recorded here.",
        f"- **Not batch noise.** PIT-normal's outputs depend {min(noise):.2g}–{max(noise):.2g}× as much "
        "on the rest of the batch as bn's, but PIT-uniform depends less than bn and trains worst.",
        f"- **Both places cost.** The train-accuracy gap to bn is {gap_all:.3f} with the norms in all "
        f"four layers and {gap_conv:.3f} with norms in the conv layers only.",
        "- **The learning rate closes part of it.** At 10 epochs, the smoothed PIT's best lr (0.5, "
        "chosen on seed 0) raised its test accuracy from 0.72 to 0.80 against bn's 0.88 "
        "(`studies/pit-lenet/results-lr.md`). No change to the layer closed the rest here.",
        "- **Untested reading.** PIT also fixes each channel's marginal (normal or uniform), so a "
        "layer can shape its output distribution only through γ and β; separating that from the "
        "flattening slopes needs a layer that relaxes one without the other.",
        "",
    ]


def write_readme(s: dict, figs: list[str], args, n_train: int) -> None:
    v = list(s)
    md = [
        "# PIT's optimisation gap, diagnosed",
        "",
        f"d2l's LeNet (SGD lr {args.lr}, batch 128, sigmoid, seed 0), {args.epochs} epoch(s) per variant, "
        f"{n_train} FashionMNIST training images; one seed (these are per-step traces, not a comparison "
        "of means). Produced by `.venv/bin/python studies/pit-diagnosis/run.py "
        f"--epochs {args.epochs}`; every number below is in `results.json`. Eval: both protocols "
        "(running statistics; precise statistics from 100 training batches).",
        "",
        "| variant | train loss (last 100 steps) | train acc (last 100) | test acc running | test acc precise |",
        "|---|---|---|---|---|",
        *[f"| {x} | {s[x]['train_loss_last100']:.4f} | {s[x]['train_acc_last100']:.4f} | "
          f"{s[x]['test_acc_running']:.4f} | {s[x]['test_acc_precise']:.4f} |" for x in v],
        "",
        "Median over steps of ‖∂L/∂W‖ per layer, as a ratio to bn's:",
        "",
        "| variant | " + " | ".join(LAYERS) + " |",
        "|---|" + "---|" * len(LAYERS),
        *[f"| {x} | " + " | ".join(f"{_ratio(s, x, 'grad_norm_median', l):.3g}" for l in LAYERS) + " |"
          for x in v],
        "",
        "Median backward gain ‖∂L/∂x‖ / ‖∂L/∂y‖ of each norm, and the median local slope ∂y/∂x at "
        "the last probe:",
        "",
        "| variant | " + " | ".join(f"gain {k}" for k in s["bn"]["gain_median"]) + " | "
        + " | ".join(f"slope {k}" for k in s["bn"]["slope_median_last"]) + " |",
        "|---|" + "---|" * (2 * len(s["bn"]["gain_median"])),
        *[f"| {x} | " + _cells(s[x]["gain_median"], s["bn"]["gain_median"]) + " | "
          + _cells(s[x]["slope_median_last"], s["bn"]["slope_median_last"]) + " |" for x in v],
        "",
        "Batch noise: RMS(y_full − y_half) / RMS(y_full) for the first half of a batch, normalized "
        "with its whole batch vs with that half alone (median over the probes; how much a "
        "sample's training output depends on the rest of its batch):",
        "",
        "| variant | " + " | ".join(s["bn"]["batch_noise_median"]) + " |",
        "|---|" + "---|" * len(s["bn"]["batch_noise_median"]),
        *[f"| {x} | " + _cells(s[x]["batch_noise_median"], s["bn"]["batch_noise_median"]) + " |" for x in v],
        "",
        *[f"![{f}]({f})" for f in figs],
        "",
        *reading(s),
    ]
    (HERE / "README.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
