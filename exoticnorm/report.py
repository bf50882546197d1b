"""A study's report: a table (mean ± sample std over seeds, with n), figures (PNG and PDF) and
a markdown answer to the study's question computed from the numbers.

``[analysis]`` in the study file picks the answer:

* ``kind = "compare"``: every grid point against ``reference``: Δ = mean − mean_ref with the
  standard error se = √(s²/n + s_ref²/n_ref); |Δ| < 2·se reads "no detectable difference".
  Optional ``sweeps = [{norm, option}]`` plot accuracy against a norm option.
* ``kind = "lr"``: per ``facet`` value, the largest ``x`` (learning rate) whose runs all
  finished with train accuracy ≥ ``min_train_acc``, and the best one.
* ``kind = "batch"``: per ``facet`` value, accuracy against ``x`` (batch size) and the loss
  from the best batch size to the smallest one.

``focus = {axis = label}`` limits the activation figure to those cells.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .grid import Cell, Study, StudyError

__all__ = ["PointResult", "collect", "make_report", "wandb_report_for"]

FIGURE_FORMATS = ("png", "pdf")


@dataclass
class PointResult:
    """All seeds of one grid point."""

    key: str
    labels: dict[str, str]
    config: dict[str, Any]
    summaries: list[dict] = field(default_factory=list)  # finished or diverged runs
    metrics: list[list[dict]] = field(default_factory=list)  # per run, per epoch
    missing: int = 0  # seeds without a finished run of this cell's settings
    mismatched: int = 0  # of those, folders holding a run made with other settings

    @property
    def finished(self) -> list[dict]:
        return [s for s in self.summaries if s["status"] == "finished"]

    @property
    def diverged(self) -> int:
        return sum(s["status"] == "diverged" for s in self.summaries)

    def values(self, metric: str) -> list[float]:
        return [s[metric] for s in self.finished if s.get(metric) is not None]

    def mean_std(self, metric: str) -> tuple[float, float, int]:
        v = self.values(metric)
        if not v:
            return math.nan, math.nan, 0
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else math.nan), len(v)

    def epoch_time(self) -> float:
        times = [r["epoch_time"] for run in self.metrics for r in run if "epoch_time" in r]
        return statistics.mean(times) if times else math.nan


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line half-written by a killed run
    return rows


def collect(study: Study, runs: Path) -> list[PointResult]:
    """The results of every grid point, in grid order."""
    points: dict[str, PointResult] = {}
    for cell in study.cells:
        p = points.setdefault(cell.key, PointResult(cell.key, dict(cell.labels), _config(cell)))
        d = runs / cell.run_name
        summary_path = d / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        if summary is not None and summary.get("config") != p.config | {"seed": cell.config.seed}:
            p.mismatched += 1  # made with other settings (the study file changed): not this cell
            summary = None
        if summary is not None:
            p.summaries.append(summary)
            p.metrics.append(_read_metrics(d / "metrics.jsonl"))
        else:
            p.missing += 1
    return list(points.values())


def _config(cell: Cell) -> dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cell.config)))


# ---------------------------------------------------------------- numbers → text


def _fmt(mean: float, std: float, n: int, digits: int = 4) -> str:
    if n == 0:
        return "–"
    if n == 1 or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(points: list[PointResult], study: Study) -> str:
    lines = ["| cell | n | diverged | test acc | train acc | train loss | parameters | s/epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for p in points:
        params = {s.get("parameters") for s in p.finished} - {None}
        lines.append(
            f"| {p.key} | {len(p.finished)}/{len(study.seeds)} | {p.diverged} | "
            f"{_fmt(*p.mean_std('test_acc'))} | {_fmt(*p.mean_std('train_acc'))} | "
            f"{_fmt(*p.mean_std('train_loss'))} | {', '.join(map(str, sorted(params))) or '–'} | "
            f"{p.epoch_time():.1f} |")
    return "\n".join(lines) + "\n"


def _diff(a: PointResult, b: PointResult, metric: str = "test_acc") -> tuple[float, float, float]:
    """Δ = mean_a − mean_b, its standard error √(s_a²/n_a + s_b²/n_b) and Welch's degrees of
    freedom (nan where a side has fewer than two runs)."""
    ma, sa, na = a.mean_std(metric)
    mb, sb, nb = b.mean_std(metric)
    if na < 2 or nb < 2:
        return ma - mb, math.nan, math.nan
    va, vb = sa**2 / na, sb**2 / nb
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1)) if se > 0 else math.inf
    return ma - mb, se, df


def _verdict(delta: float, se: float, df: float) -> str:
    """Welch's two-sided t-test at 5%: |Δ| ≤ t_0.975(df)·se reads "no detectable difference"."""
    if math.isnan(delta):
        return "not run yet"
    if math.isnan(se):
        return "fewer than two runs on a side, no error bar"
    from scipy.stats import t

    if abs(delta) <= t.ppf(0.975, df) * se:
        return f"no detectable difference (Welch t-test, 5%, df = {df:.1f})"
    return "higher" if delta > 0 else "lower"


def _facets(points: list[PointResult], study: Study) -> dict[str, list[PointResult]]:
    facet = study.analysis.get("facet")
    groups: dict[str, list[PointResult]] = {}
    for p in points:
        groups.setdefault(p.labels.get(facet, "all") if facet else "all", []).append(p)
    return groups


def _x(p: PointResult, study: Study) -> float:
    return float(p.config[study.analysis["x"]])


def _converged(p: PointResult, min_train_acc: float) -> bool:
    return (p.missing == 0 and p.diverged == 0 and bool(p.finished)
            and all(s["train_acc"] >= min_train_acc for s in p.finished))


def answer(points: list[PointResult], study: Study) -> str:
    kind = study.analysis.get("kind", "compare")
    if not any(p.finished for p in points):
        return "No finished runs yet: run the study first (`exoticnorm run`)."
    lines = []
    if kind == "compare":
        ref_key = study.analysis.get("reference", points[0].key)
        ref = next((p for p in points if p.key == ref_key), None)
        if ref is None:
            raise StudyError(f"{study.path}: analysis.reference {ref_key!r} is not a cell; the cells are "
                             f"{', '.join(p.key for p in points)}")
        ranked = sorted((p for p in points if p.finished), key=lambda p: -p.mean_std("test_acc")[0])
        best = ranked[0]
        lines.append(f"Highest mean test accuracy: **{best.key}** ({_fmt(*best.mean_std('test_acc'))}, "
                     f"n = {len(best.finished)}). Against the reference **{ref.key}** "
                     f"({_fmt(*ref.mean_std('test_acc'))}):")
        lines.append("")
        for p in ranked:
            if p is ref:
                continue
            d, se, df = _diff(p, ref)
            extra = ""
            pa, pr = p.finished[0].get("parameters"), ref.finished[0].get("parameters") if ref.finished else None
            if pa and pr and pa != pr:
                extra = f"; {pa - pr:+d} parameters ({pa} vs {pr})"
            se_txt = "" if math.isnan(se) else f" ± {se:.4f} (se)"
            lines.append(f"- {p.key}: Δ = {d:+.4f}{se_txt}: {_verdict(d, se, df)}{extra}"
                         + (f"; {p.diverged} run(s) diverged" if p.diverged else ""))
    elif kind == "lr":
        min_acc = float(study.analysis.get("min_train_acc", 0.5))
        lines.append(f"Converged = every seed finished without divergence with train accuracy ≥ {min_acc}.")
        lines.append("")
        lines.append("| norm | largest converging lr | best lr | test acc at best lr | diverged (runs) |")
        lines.append("|---|---|---|---|---|")
        for facet, group in _facets(points, study).items():
            ok = [p for p in group if _converged(p, min_acc)]
            largest = max((_x(p, study) for p in ok), default=None)
            scored = [p for p in group if p.finished]
            best = max(scored, key=lambda p: p.mean_std("test_acc")[0]) if scored else None
            lines.append(f"| {facet} | {largest if largest is not None else 'none'} | "
                         f"{_x(best, study) if best else '–'} | "
                         f"{_fmt(*best.mean_std('test_acc')) if best else '–'} | "
                         f"{sum(p.diverged for p in group)} |")
    elif kind == "batch":
        facets = _facets(points, study)
        xs = sorted({_x(p, study) for p in points})
        lines.append("Test accuracy, mean ± std over seeds, per norm (rows) and batch size (columns):")
        lines.append("")
        lines.append("| norm | " + " | ".join(f"{x:g}" for x in xs) + " |")
        lines.append("|---" * (len(xs) + 1) + "|")
        for facet, group in facets.items():
            by_x = {_x(p, study): p for p in group}
            lines.append(f"| {facet} | " + " | ".join(
                _fmt(*by_x[x].mean_std("test_acc"), digits=3) if x in by_x else "–" for x in xs) + " |")
        ref_name = study.analysis.get("reference")
        for x in (xs[0], xs[-1]):
            at_x = {f: next((p for p in g if _x(p, study) == x and p.finished), None) for f, g in facets.items()}
            at_x = {f: p for f, p in at_x.items() if p is not None}
            if not at_x:
                continue
            best = max(at_x, key=lambda f: at_x[f].mean_std("test_acc")[0])
            lines.append("")
            lines.append(f"At batch size {x:g} the best is **{best}** ({_fmt(*at_x[best].mean_std('test_acc'))}).")
            if ref_name in at_x:
                for f, p in at_x.items():
                    if f != ref_name:
                        d, se, df = _diff(p, at_x[ref_name])
                        se_txt = "" if math.isnan(se) else f" ± {se:.4f} (se)"
                        lines.append(f"- {f} vs {ref_name}: Δ = {d:+.4f}{se_txt}: {_verdict(d, se, df)}")
    else:
        raise StudyError(f"{study.path}: analysis.kind must be compare, lr or batch, got {kind!r}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- figures


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


def _short(p: PointResult, study: Study) -> str:
    facet = study.analysis.get("facet")
    rest = [label for axis, label in p.labels.items() if axis != facet]
    return "_".join(rest) or p.key


def fig_curves(points: list[PointResult], study: Study, out: Path) -> list[str]:
    """Test (solid, ±std band) and train (dashed) accuracy per epoch, one panel per facet."""
    groups = {k: [p for p in v if p.finished] for k, v in _facets(points, study).items()}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return []
    fig, axes = _grid_axes(len(groups))
    cmap = _plt().get_cmap("viridis" if study.analysis.get("kind") in ("lr", "batch") else "tab10")
    for ax, (facet, group) in zip(axes, groups.items()):
        for i, p in enumerate(group):
            color = cmap(i / max(1, len(group) - 1)) if cmap.N > 20 else cmap(i % 10)
            ep, m, s = _per_epoch(p, "test_acc")
            if not ep:
                continue
            ax.plot(ep, m, color=color, label=_short(p, study))
            ax.fill_between(ep, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color, alpha=0.2)
            ep, m, _ = _per_epoch(p, "train_acc")
            ax.plot(ep, m, color=color, linestyle="--", linewidth=0.8)
        ax.set_title(facet if facet != "all" else study.name)
        ax.set_xlabel("epoch")
        _integer_x(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy (test solid, train dashed)")
    fig.suptitle(f"{study.name}: accuracy per epoch (mean ± std over seeds)")
    return _save(fig, out, "accuracy_per_epoch")


def fig_final_vs_x(points: list[PointResult], study: Study, out: Path) -> list[str]:
    """Final test accuracy against the study's x (lr or batch size), one line per facet;
    ✕ marks a point where a run diverged, the dotted line the largest converging lr."""
    if "x" not in study.analysis:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    min_acc = float(study.analysis.get("min_train_acc", 0.5))
    for i, (facet, group) in enumerate(_facets(points, study).items()):
        color = plt.get_cmap("tab10")(i % 10)
        xs, ms, ss = [], [], []
        for p in sorted(group, key=lambda p: _x(p, study)):
            m, s, n = p.mean_std("test_acc")
            if n:
                xs.append(_x(p, study)), ms.append(m), ss.append(0.0 if math.isnan(s) else s)
            if p.diverged:
                ax.scatter([_x(p, study)], [0.0], marker="x", color=color, s=50)
        ax.errorbar(xs, ms, yerr=ss, color=color, marker="o", markersize=3, capsize=2, label=facet)
        if study.analysis.get("kind") == "lr":
            ok = [_x(p, study) for p in group if _converged(p, min_acc)]
            if ok:
                ax.axvline(max(ok), color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2 if study.analysis["x"] == "batch_size" else 10)
    ax.set_xlabel(study.analysis["x"])
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(-0.03, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    title = "final test accuracy"
    if study.analysis.get("kind") == "lr":
        title += " (✕ at 0: a run diverged; dotted: largest converging lr)"
    ax.set_title(title, fontsize=10)
    return _save(fig, out, f"accuracy_vs_{study.analysis['x']}")


def fig_activations(points: list[PointResult], study: Study, out: Path) -> list[str]:
    """Each norm layer's output mean (top) and std (bottom) per epoch (seed means)."""
    focus = study.analysis.get("focus", {})
    chosen = [p for p in points if p.finished and all(p.labels.get(a) == l for a, l in focus.items())]
    sites: list[str] = []
    for p in chosen:
        for run in p.metrics:
            for k in (run[0] if run else {}):
                if k.startswith("act/") and k.endswith("/mean") and k.split("/")[1] not in sites:
                    sites.append(k.split("/")[1])
    if not chosen or not sites:
        return []
    plt = _plt()
    fig, axes = plt.subplots(2, len(sites), figsize=(3.6 * len(sites), 5.5), squeeze=False, layout="constrained")
    for i, p in enumerate(chosen):
        color = plt.get_cmap("tab10")(i % 10)
        for j, site in enumerate(sites):
            for row, stat in enumerate(("mean", "std")):
                ep, m, _ = _per_epoch(p, f"act/{site}/{stat}") if all(
                    f"act/{site}/{stat}" in r for run in p.metrics for r in run) else ([], [], [])
                if ep:
                    axes[row][j].plot(ep, m, color=color, marker=".", label=p.key)
                axes[row][j].set_title(f"{site} output {stat}", fontsize=9)
                axes[row][j].grid(alpha=0.3)
                _integer_x(axes[row][j])
    for j in range(len(sites)):
        axes[1][j].set_xlabel("epoch")
    axes[0][0].legend(fontsize=7)
    where = ", ".join(f"{a} = {l}" for a, l in focus.items())
    fig.suptitle(f"{study.name}: norm-layer output mean and std in training (epoch averages)"
                 + (f", {where}" if where else ""))
    return _save(fig, out, "activations")


def fig_sweeps(points: list[PointResult], study: Study, out: Path) -> list[str]:
    """Test accuracy against a norm option (group size, density), reference as a band."""
    names = []
    ref_key = study.analysis.get("reference")
    ref = next((p for p in points if p.key == ref_key and p.finished), None)
    for sweep in study.analysis.get("sweeps", []):
        norm, option = sweep["norm"], sweep["option"]
        chosen = sorted((p for p in points if p.config["norm"] == norm and option in p.config["norm_opts"]
                         and p.finished), key=lambda p: p.config["norm_opts"][option])
        if not chosen:
            continue
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5.5, 4))
        xs = [p.config["norm_opts"][option] for p in chosen]
        ms = [p.mean_std("test_acc")[0] for p in chosen]
        ss = [0.0 if math.isnan(p.mean_std("test_acc")[1]) else p.mean_std("test_acc")[1] for p in chosen]
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=norm)
        if ref is not None:
            m, s, _ = ref.mean_std("test_acc")
            s = 0.0 if math.isnan(s) else s
            ax.axhline(m, color="gray", linestyle="--", label=f"{ref.key} (± std band)")
            ax.axhspan(m - s, m + s, color="gray", alpha=0.2)
        if option == "group_size":
            ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{norm} {option}")
        ax.set_ylabel("final test accuracy")
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
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 0.25 * len(timed) + 1.2), layout="constrained")
    facet = study.analysis.get("facet")
    names = list(dict.fromkeys(p.labels.get(facet, "") for p in timed)) if facet else [""]
    colors = [_plt().get_cmap("tab10")(names.index(p.labels.get(facet, "") if facet else "") % 10) for p in timed]
    ax.barh([p.key for p in timed], [p.epoch_time() for p in timed], color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per epoch (mean over epochs and seeds)")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{study.name}: seconds per epoch (training + evaluation; the machine's load counts)",
                 fontsize=9)
    return _save(fig, out, "epoch_time")


# ---------------------------------------------------------------- the report


def make_report(study: Study, runs: Path, out: Path, echo: Callable[[str], None] = print) -> Path:
    """Write ``out/README.md``, ``out/results.json`` and the figures; return the README path."""
    if not runs.is_dir():
        raise StudyError(f"no runs folder {runs}; run the study first: exoticnorm run {study.path}"
                         + (" --quick" if study.quick else ""))
    points = collect(study, runs)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for make in (fig_curves, fig_final_vs_x, fig_sweeps, fig_activations, fig_epoch_time):
        figures += make(points, study, out)
    n_runs = sum(len(p.summaries) for p in points)
    missing = sum(p.missing for p in points)
    mismatched = sum(p.mismatched for p in points)
    envs = sorted({f"{s.get('device')}, torch {s.get('torch')}" for p in points for s in p.summaries})
    quick = " --quick" if study.quick else ""
    md = [
        f"# Study `{study.name}`{' (quick form)' if study.quick else ''}",
        "",
        f"**Question.** {' '.join(study.question.split())}",
        "",
        "## Answer (from the numbers below)",
        "",
        answer(points, study),
        *([f"**Reading it.** {' '.join(study.notes.split())}", ""] if study.notes else []),
        f"{n_runs} runs over seeds {study.seeds}" + (f"; {missing} not run yet" if missing else "")
        + (f" ({mismatched} folders hold runs made with other settings, left out)" if mismatched else "")
        + f"; {', '.join(envs)}. Mean ± sample std over seeds; n = finished runs.",
        "",
        "Reproduce:",
        "",
        "```bash",
        f"exoticnorm run {study.path}{quick}  # add --jobs 2 on a 2-core machine",
        f"exoticnorm report {study.path}{quick}",
        "```",
        "",
        "## Results",
        "",
        table(points, study),
        "## Figures",
        "",
    ]
    md += [f"![{name}]({name})" for name in figures if name.endswith(".png")]
    readme = out / "README.md"
    readme.write_text("\n".join(md) + "\n")
    results = [{"cell": p.key, "labels": p.labels, "config": p.config, "n": len(p.finished),
                "diverged": p.diverged, "missing": p.missing,
                "test_acc": p.values("test_acc"), "train_acc": p.values("train_acc"),
                "epoch_time": p.epoch_time()} for p in points]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    echo(f"{study.name}: {n_runs} runs, {len(figures)} figure files in {out}")
    return readme


def wandb_report_for(study: Study, echo: Callable[[str], None] = print, save: bool = True):
    """A wandb report with the study's panels (needs wandb-workspaces, login and network).

    Offline (no login, or ``WANDB_MODE`` offline/disabled) it says how to sync and returns None.
    """
    from .tracking import logged_in

    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun") or not logged_in():
        echo("wandb report: not online (WANDB_MODE=%s, logged in: %s). Upload the runs first with "
             "`wandb sync runs/studies/%s/*/wandb/offline-run-*`, log in with `wandb login`, then run "
             "`exoticnorm report %s --wandb-report` again." % (mode or "unset", logged_in(),
                                                               study.run_dir_name, study.path))
        return None
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as exc:
        raise StudyError("--wandb-report needs wandb-workspaces: pip install 'exoticnorm[report]'") from exc
    report = build_wandb_report(study, wr)
    if save:
        report.save()
        echo(f"wandb report: {report.url}")
    return report


def build_wandb_report(study: Study, wr, entity: str | None = None, project: str | None = None):
    """The report object: the question, then panels over the study's runs (wandb config
    ``study`` = the study's group), grouped by the grid axes, mean ± std over seeds."""
    from wandb_workspaces import expr

    project = project or os.environ.get("WANDB_PROJECT", "exoticnorm")
    entity = entity or os.environ.get("WANDB_ENTITY", "")
    runset = wr.Runset(entity=entity, project=project, name=study.run_dir_name,
                       filters=[expr.Config("study") == study.run_dir_name], groupby=list(study.axes))
    agg = {"groupby_aggfunc": "mean", "groupby_rangefunc": "stddev"}
    panels = [wr.LinePlot(title=f"{metric} per epoch", x="Step", y=[metric], **agg)
              for metric in ("test_acc", "train_acc", "train_loss", "epoch_time")]
    if "x" in study.analysis:
        panels.append(wr.ScatterPlot(title=f"test accuracy vs {study.analysis['x']}",
                                     x=wr.Config(study.analysis["x"]), y=wr.SummaryMetric("test_acc"),
                                     log_x=True))
    question = " ".join(study.question.split())
    return wr.Report(project=project, entity=entity, title=f"exoticnorm study: {study.run_dir_name}",
                     description=question, blocks=[wr.H1(text=study.run_dir_name), wr.P(text=question),
                                                   wr.PanelGrid(runsets=[runset], panels=panels)])
