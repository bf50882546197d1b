"""The report's figures. Each ``fig_*(points, study, out)`` writes PNG and PDF files into
``out`` and returns their names (none when it has nothing to draw). Test accuracy is the
study's protocol's (``points.acc_key``).

matplotlib and torch are imported on first use: study.py imports the kinds table
(analysis.py), which names these functions.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from .points import MIN_TRAIN_ACC, PointResult, acc_key, converged, facets, protocol, short_label, x_of

if TYPE_CHECKING:
    from .study import Study

__all__ = ["FIGURE_FORMATS", "fig_curves", "fig_final_vs_x", "fig_sweeps", "fig_epoch_time",
           "fig_activations", "focus_runs", "FIRST_BATCHES", "SATURATED", "MAX_SITES"]

FIGURE_FORMATS = ("png", "pdf")
FIRST_BATCHES = 20  # steps in the "first batches" activation figure
SATURATED = 3.0  # |y| beyond this counts as saturated: σ(3) ≈ 0.95
MAX_SITES = 8  # norm sites (columns) per activation figure; a ResNet-20 has 21


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> list[str]:
    names = []
    for ext in FIGURE_FORMATS:
        meta = {"CreationDate": None} if ext == "pdf" else {}  # same figure, same file
        fig.savefig(out / f"{name}.{ext}", dpi=120, bbox_inches="tight", metadata=meta)
        names.append(f"{name}.{ext}")
    _plt().close(fig)
    return names


def _color(i: int, n: int):
    """Distinct colours for n lines: tab10 up to 10, tab20 beyond (repeating past 20)."""
    cmap = _plt().get_cmap("tab10" if n <= 10 else "tab20")
    return cmap(i % cmap.N)


def _per_epoch(p: PointResult, metric: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over the finished seeds, per epoch (epochs all of them reached)."""
    runs = [r for r, s in zip(p.metrics, p.summaries) if s["status"] == "finished" and r]
    if not runs:
        return [], [], []
    n = min(len(r) for r in runs)
    means, stds = [], []
    for e in range(n):
        v = [r[e][metric] for r in runs]
        means.append(statistics.mean(v))
        stds.append(statistics.stdev(v) if len(v) > 1 else 0.0)
    return list(range(1, n + 1)), means, stds


def _grid_axes(n: int, width: float = 4.0, height: float = 3.2):
    plt = _plt()
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharey=True,
                             layout="constrained")
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat[:n]


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def fig_curves(points: list[PointResult], study: Study, out: Path) -> list[str]:
    """Test (solid, ±std band) and train (dashed) accuracy per epoch, one panel per facet."""
    groups = {k: [p for p in v if p.finished] for k, v in facets(points, study).items()}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return []
    fig, axes = _grid_axes(len(groups))
    ordered = "x" in study.analysis  # points along an x: a sequential colour map
    for ax, (facet, group) in zip(axes, groups.items()):
        for i, p in enumerate(group):
            color = _plt().get_cmap("viridis")(i / max(1, len(group) - 1)) if ordered else _color(i, len(group))
            ep, m, s = _per_epoch(p, acc_key(study))
            if not ep:
                continue
            ax.plot(ep, m, color=color, label=short_label(p, study))
            ax.fill_between(ep, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color, alpha=0.2)
            ep, m, _ = _per_epoch(p, "train_acc")
            ax.plot(ep, m, color=color, linestyle="--", linewidth=0.8)
        ax.set_title(facet if facet != "all" else study.name)
        ax.set_xlabel("epoch")
        _integer_x(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy (test solid, train dashed)")
    fig.suptitle(f"{study.name}: accuracy per epoch (mean ± std over seeds; test with {protocol(study)} statistics)")
    return _save(fig, out, "accuracy_per_epoch")


def fig_final_vs_x(points: list[PointResult], study: Study, out: Path, boundary: bool = False) -> list[str]:
    """Final test accuracy against the study's x (lr or batch size), one line per facet;
    ✕ marks a point where a run diverged; with ``boundary`` a dotted line marks the largest
    converging x (analysis.min_train_acc)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    min_acc = float(study.analysis.get("min_train_acc", MIN_TRAIN_ACC))
    for i, (facet, group) in enumerate(facets(points, study).items()):
        color = _color(i, 10)
        xs, ms, ss = [], [], []
        for p in sorted(group, key=lambda p: x_of(p, study)):
            m, s, n = p.mean_std(acc_key(study))
            if n:
                xs.append(x_of(p, study)), ms.append(m), ss.append(0.0 if math.isnan(s) else s)
            if p.diverged:
                ax.scatter([x_of(p, study)], [0.0], marker="x", color=color, s=50)
        ax.errorbar(xs, ms, yerr=ss, color=color, marker="o", markersize=3, capsize=2, label=facet)
        ok = [x_of(p, study) for p in group if converged(p, min_acc)] if boundary else []
        if ok:
            ax.axvline(max(ok), color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2 if study.analysis["x"] == "batch_size" else 10)
    ax.set_xlabel(study.analysis["x"])
    ax.set_ylabel(f"final test accuracy ({protocol(study)})")
    ax.set_ylim(-0.03, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("final test accuracy" + (" (✕ at 0: a run diverged; dotted: largest converging "
                                          f"{study.analysis['x']})" if boundary else ""), fontsize=10)
    return _save(fig, out, f"accuracy_vs_{study.analysis['x']}")


def fig_sweeps(points: list[PointResult], study: Study, out: Path) -> list[str]:
    """Test accuracy against a norm option (group size, density), reference as a band."""
    names = []
    key = acc_key(study)
    ref = next((p for p in points if p.key == study.analysis.get("reference") and p.finished), None)
    for sweep in study.analysis.get("sweeps", []):
        norm, option = sweep["norm"], sweep["option"]
        chosen = sorted((p for p in points if p.config["norm"] == norm and option in p.config["norm_opts"]
                         and p.finished), key=lambda p: p.config["norm_opts"][option])
        if not chosen:
            continue
        fig, ax = _plt().subplots(figsize=(5.5, 4))
        stats = [p.mean_std(key) for p in chosen]
        ax.errorbar([p.config["norm_opts"][option] for p in chosen], [m for m, _, _ in stats],
                    yerr=[0.0 if math.isnan(s) else s for _, s, _ in stats], marker="o", capsize=3, label=norm)
        if ref is not None:
            m, s, _ = ref.mean_std(key)
            s = 0.0 if math.isnan(s) else s
            ax.axhline(m, color="gray", linestyle="--", label=f"{ref.key} (± std band)")
            ax.axhspan(m - s, m + s, color="gray", alpha=0.2)
        if option == "group_size":
            ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{norm} {option}")
        ax.set_ylabel(f"final test accuracy ({protocol(study)})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"test accuracy vs {option} (mean ± std)", fontsize=10)
        names += _save(fig, out, f"accuracy_vs_{option}")
    return names


def fig_epoch_time(points: list[PointResult], study: Study, out: Path) -> list[str]:
    """Mean seconds per epoch (training + evaluation) per grid point."""
    timed = [p for p in points if not math.isnan(p.epoch_time())]
    if not timed:
        return []
    fig, ax = _plt().subplots(figsize=(6.5, 0.25 * len(timed) + 1.2), layout="constrained")
    facet = study.analysis.get("facet")
    names = list(dict.fromkeys(p.labels.get(facet, "") for p in timed)) if facet else [""]
    colors = [_color(names.index(p.labels.get(facet, "") if facet else ""), 10) for p in timed]
    ax.barh([p.key for p in timed], [p.epoch_time() for p in timed], color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per epoch (mean over epochs and seeds)")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{study.name}: seconds per epoch (training + evaluation; the machine's load counts)",
                 fontsize=9)
    return _save(fig, out, "epoch_time")


# ---------------------------------------------------------------- per-batch activations


def focus_runs(points: list[PointResult], study: Study) -> list[tuple[PointResult, Path]]:
    """The first seed's run folder of every cell matching ``analysis.focus`` ({axis = label or
    [labels]}; default: all cells)."""
    focus, seed = study.analysis.get("focus", {}), study.seeds[0]
    wanted = {a: labels if isinstance(labels, list) else [labels] for a, labels in focus.items()}
    return [(p, p.dirs[p.seeds.index(seed)]) for p in points
            if seed in p.seeds and all(p.labels.get(a) in labels for a, labels in wanted.items())]


def _smooth(y, window: int):
    """Centred moving mean over ``window`` steps, skipping NaN rows (steps a resume lost)."""
    import numpy as np

    ok = np.isfinite(y)
    kernel = np.ones(window)
    total = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
    count = np.convolve(ok.astype(float), kernel, mode="same")
    return np.where(count > 0, total / np.maximum(count, 1.0), np.nan)


def _saturated_bins(edges: list[float]) -> tuple[list[int], str]:
    """The histogram bins beyond ±SATURATED (whole bins), and how to name that range."""
    lo = max((e for e in edges if e <= -SATURATED), default=-math.inf)
    hi = min((e for e in edges if e >= SATURATED), default=math.inf)
    bins = [b for b in range(len(edges) - 1) if edges[b + 1] <= lo or edges[b] >= hi]
    return bins, (f"|y| > {hi:g}" if lo == -hi else f"y < {lo:g} or y > {hi:g}")


def fig_activations(points: list[PointResult], study: Study, out: Path) -> list[str]:
    """From the ``activations.pt`` of ``focus_runs`` (runs without one are skipped): each
    norm's output mean and std per batch over the first FIRST_BATCHES steps and over the whole
    run, the histogram of its outputs over time, and the fraction beyond ±SATURATED."""
    from .activations import load_activations

    runs = [(p, load_activations(d / "activations.pt")) for p, d in focus_runs(points, study)
            if (d / "activations.pt").is_file()]
    runs = [(p, a) for p, a in runs if a["sites"] and len(a["mean"])]
    sites = list(dict.fromkeys(s for _, a in runs for s in a["sites"]))
    if not sites:
        return []
    where = ", ".join(f"{a} = {label}" for a, label in study.analysis.get("focus", {}).items())
    about = f"seed {study.seeds[0]}" + (f", {where}" if where else "")
    if len(sites) > MAX_SITES:  # evenly spaced in forward order, first and last included
        about += f", {MAX_SITES} of {len(sites)} norm sites"
        sites = [sites[round(i * (len(sites) - 1) / (MAX_SITES - 1))] for i in range(MAX_SITES)]
    return (_fig_act_lines(runs, sites, study, out, about, first=True)
            + _fig_act_lines(runs, sites, study, out, about, first=False)
            + _fig_act_hist(runs, sites, study, out, about)
            + _fig_act_saturated(runs, sites, study, out, about))


def _site_axes(rows: int, sites: list[str], height: float = 2.8):
    return _plt().subplots(rows, len(sites), figsize=(3.6 * len(sites), height * rows), squeeze=False,
                           layout="constrained")


def _legend(fig, axes) -> None:
    """One legend for the figure, right of the panels (a cell per line, however many)."""
    found = {}
    for ax in (a for row in axes for a in row):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            found.setdefault(label, handle)
    fig.legend(list(found.values()), list(found), loc="outside right upper", fontsize=7)


def _fig_act_lines(runs, sites, study: Study, out: Path, about: str, first: bool) -> list[str]:
    """Per-step output mean (top) and std (bottom) per norm site, one line per cell: the first
    FIRST_BATCHES steps as recorded, or the whole run (x in epochs) smoothed by a centred
    moving mean over 1% of the run's steps."""
    import numpy as np

    fig, axes = _site_axes(2, sites)
    for i, (p, acts) in enumerate(runs):
        spe, steps = acts["steps_per_epoch"], len(acts["mean"])
        window = max(1, steps // 100)
        for col, site in enumerate(acts["sites"]):
            if site not in sites:
                continue
            j = sites.index(site)
            for row, stat in enumerate(("mean", "std")):
                y = acts[stat][:, col].double().numpy()
                if first:
                    x, y = np.arange(1, min(FIRST_BATCHES, steps) + 1), y[:FIRST_BATCHES]
                else:
                    x, y = np.arange(steps) / spe, _smooth(y, window)
                axes[row][j].plot(x, y, color=_color(i, len(runs)), linewidth=1,
                                  marker="." if first else None, label=p.key)
    for j, site in enumerate(sites):
        for row, stat in enumerate(("mean", "std")):
            axes[row][j].set_title(f"{site} output {stat}", fontsize=9)
            axes[row][j].grid(alpha=0.3)
        axes[1][j].set_xlabel("training step (batch)" if first else "epoch")
        if first:
            _integer_x(axes[1][j])
    _legend(fig, axes)
    if first:
        title, name = f"the first {FIRST_BATCHES} batches", "activations_first_batches"
    else:
        title, name = "every batch (centred moving mean over 1% of the run's steps)", "activations_per_batch"
    fig.suptitle(f"{study.name}: norm-layer output mean and std in training, {title}; {about}")
    return _save(fig, out, name)


def _fig_act_hist(runs, sites, study: Study, out: Path, about: str) -> list[str]:
    """fastai's ``color_dim``: per cell (row) and site (column), the fraction of the norm's
    outputs per bin (y) against training time (x), on a log colour scale."""
    import numpy as np
    from matplotlib.colors import LogNorm

    runs = [(p, a) for p, a in runs if len(a["hist_step"])]
    if not runs:
        return []
    fig, axes = _site_axes(len(runs), sites, height=1.7)
    cmap = _plt().get_cmap("viridis").with_extremes(bad=_plt().get_cmap("viridis")(0.0))  # empty bins
    norm, mesh = LogNorm(vmin=1e-4, vmax=1.0, clip=True), None
    for r, (p, acts) in enumerate(runs):
        edges = acts["hist_edges"].tolist()
        steps = acts["hist_step"].double().numpy()
        x = np.append(steps, min(steps[-1] + acts["hist_every"], len(acts["mean"]))) / acts["steps_per_epoch"]
        finite = [b for b, e in enumerate(edges) if math.isfinite(e)]
        ticks = finite[:: max(1, len(finite) // 4)]
        sat = [b for b, e in enumerate(edges) if abs(e) == SATURATED]
        for j, site in enumerate(sites):
            ax = axes[r][j]
            if site not in acts["sites"]:
                ax.set_visible(False)
                continue
            frac = acts["hist"][:, acts["sites"].index(site), :].double().numpy()
            mesh = ax.pcolormesh(x, np.arange(len(edges)), np.ma.masked_equal(frac.T, 0.0), cmap=cmap,
                                 norm=norm, shading="flat", rasterized=True)
            for b in sat:
                ax.axhline(b, color="white", linestyle=":", linewidth=0.6)
            ax.set_yticks(ticks, [f"{edges[b]:g}" for b in ticks], fontsize=6)
            ax.tick_params(axis="x", labelsize=6)
            if r == 0:
                ax.set_title(site, fontsize=9)
            if j == 0:
                ax.set_ylabel(p.key, fontsize=7)
            if r == len(runs) - 1:
                ax.set_xlabel("epoch", fontsize=7)
    fig.colorbar(mesh, ax=axes, label="fraction of outputs per bin (log)", shrink=0.6)
    fig.suptitle(f"{study.name}: histogram of each norm's outputs over training (outer bins: the tails; "
                 f"dotted: ±{SATURATED:g}); {about}", fontsize=10)
    return _save(fig, out, "activations_histogram")


def _fig_act_saturated(runs, sites, study: Study, out: Path, about: str) -> list[str]:
    """Per site, the fraction of the norm's outputs beyond ±SATURATED against training time
    (from the histograms): inputs of a sigmoid that far out are saturated, σ(3) ≈ 0.95."""
    runs = [(p, a) for p, a in runs if len(a["hist_step"])]
    if not runs:
        return []
    fig, axes = _site_axes(1, sites)
    label = ""
    for i, (p, acts) in enumerate(runs):
        bins, label = _saturated_bins(acts["hist_edges"].tolist())
        x = acts["hist_step"].double().numpy() / acts["steps_per_epoch"]
        for col, site in enumerate(acts["sites"]):
            if site not in sites:
                continue
            frac = acts["hist"][:, col, bins].double().sum(-1).numpy()
            axes[0][sites.index(site)].plot(x, frac, color=_color(i, len(runs)), linewidth=1, label=p.key,
                                            marker="." if len(x) < 50 else None)
    for j, site in enumerate(sites):
        axes[0][j].set_title(f"{site}: fraction with {label}", fontsize=9)
        axes[0][j].set_xlabel("epoch")
        axes[0][j].set_ylim(bottom=0.0)
        axes[0][j].grid(alpha=0.3)
    _legend(fig, axes)
    fig.suptitle(f"{study.name}: norm outputs with {label} (sigmoid nets: saturated, σ(3) ≈ 0.95); {about}")
    return _save(fig, out, "activations_saturated")
