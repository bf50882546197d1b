"""A study's report: ``README.md`` (the answer to the study's question computed from the
numbers, a table of mean ± sample std over seeds with n, the figures), the figures as PNG and
PDF, ``results.json``, and optionally a wandb report.

The answer, the figures and the table's accuracy come from the runs' ``test_acc_<protocol>``
(``analysis.protocol``, default "precise"; points.PROTOCOLS); the bare ``test_acc`` of a run
is not read. Runs recorded before both protocols were (no ``test_acc_running`` or
``test_acc_precise``) stop the report with a StudyError that says how to re-run them.

``results.json`` holds one entry per grid point: ``cell``, ``labels``, ``config``, ``n``
(finished runs), ``diverged``, ``missing``, ``seeds`` (of the finished runs), ``protocol``
(the study's), ``test_acc`` (per finished seed, under the study's protocol, so readers of the
older file get the numbers the answer used), ``test_acc_running`` and ``test_acc_precise``
(per finished seed), ``train_acc``, ``epoch_time``, and where the kind compares points
(compare: each cell against the reference; batch: each facet value against the reference's
at the same x) ``vs_reference`` = {reference, delta, ci_low, ci_high, p, n, n_ref} from
stats.welch (null where a side has one run).

``summarize`` tables loose run folders (``exoticnorm summarize``) with the same statistics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

from .analysis import answer, difference, kind_of
from .figures import fig_activations, fig_curves, fig_epoch_time, focus_runs
from .study import Study, StudyError, config_dict
from .points import ACC_KEYS, PROTOCOLS, PointResult, acc_key, fmt, protocol

__all__ = ["collect", "table", "summarize", "make_report", "wandb_report_for", "build_wandb_report"]

PROTOCOL_KEYS = (ACC_KEYS["running"], ACC_KEYS["precise"])


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
    """The results of every grid point, in grid order; StudyError if any cell's folder holds a
    run recorded before the two eval protocols."""
    points: dict[str, PointResult] = {}
    old: dict[str, int] = {}
    for cell in study.cells:
        p = points.setdefault(cell.key, PointResult(cell.key, dict(cell.labels), config_dict(cell.config)))
        d = runs / cell.run_name
        summary_path = d / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        if summary is not None and not set(PROTOCOL_KEYS) <= summary.keys():
            old[cell.key] = old.get(cell.key, 0) + 1  # whatever its settings: it cannot be read
            continue
        if summary is not None and summary.get("config") != p.config | {"seed": cell.config.seed}:
            p.mismatched += 1  # made with other settings (the study file changed): not this cell
            summary = None
        if summary is None:
            p.missing += 1
            continue
        metrics = _read_metrics(d / "metrics.jsonl")
        if any(not set(PROTOCOL_KEYS) <= line.keys() for line in metrics):  # resumed across the change
            old[cell.key] = old.get(cell.key, 0) + 1
            p.missing += 1
            continue
        p.summaries.append(summary)
        p.metrics.append(metrics)
        p.dirs.append(d)
        p.seeds.append(cell.config.seed)
    if old:
        cells = ", ".join(list(old)[:10]) + (f" and {len(old) - 10} more" if len(old) > 10 else "")
        quick = " --quick" if study.quick else ""
        raise StudyError(
            f"{sum(old.values())} run(s) in {runs}, of cell(s) {cells}, were recorded under the old "
            f"per-norm eval protocol (no {' or '.join(PROTOCOL_KEYS)}) and are not mixed with the "
            f"others. Re-run them: move the runs folder aside (mv {runs} {runs}.old-protocol), then "
            f"exoticnorm run {study.path}{quick} --out {runs}. Nothing was deleted.")
    return list(points.values())


# ---------------------------------------------------------------- numbers → text


def _protocols_differ(points: list[PointResult]) -> bool:
    return any(p.values("test_acc_running") != p.values("test_acc_precise") for p in points)


def table(points: list[PointResult], study: Study) -> str:
    """One row per grid point; test accuracy under both protocols when they differ anywhere,
    else one column."""
    both = _protocols_differ(points)
    accs = list(PROTOCOL_KEYS) if both else [acc_key(study)]
    heads = ["test acc running", "test acc precise"] if both else ["test acc"]
    lines = ["| cell | n | diverged | " + " | ".join(heads) + " | train acc | train loss | parameters | s/epoch |",
             "|---" * (7 + len(heads)) + "|"]
    for p in points:
        params = {s.get("parameters") for s in p.finished} - {None}
        lines.append(
            f"| {p.key} | {len(p.finished)}/{len(study.seeds)} | {p.diverged} | "
            + " | ".join(fmt(*p.mean_std(k)) for k in accs)
            + f" | {fmt(*p.mean_std('train_acc'))} | {fmt(*p.mean_std('train_loss'))} | "
            f"{', '.join(map(str, sorted(params))) or '–'} | {p.epoch_time():.1f} |")
    return "\n".join(lines) + "\n"


OLD_ACC = "test acc (old per-norm protocol)"


def summarize(run_dirs: Iterable[str | Path]) -> tuple[int, str]:
    """(runs read, markdown table) of the runs among ``run_dirs`` with a summary.json: one row
    per config except the seed (named by the norm, its options and any setting that differs
    between rows), n finished, mean ± sample std. Runs recorded before the two protocols get
    rows of their own, their bare ``test_acc`` in the OLD_ACC column, never in the new ones."""
    from .train import RunConfig

    defaults = config_dict(RunConfig())  # runs made before a field existed
    groups: dict[str, PointResult] = {}
    for d in map(Path, run_dirs):
        if (d / "summary.json").is_file():
            s = json.loads((d / "summary.json").read_text())
            config = {k: v for k, v in {**defaults, **s["config"]}.items() if k != "seed"}
            key = json.dumps([config, set(PROTOCOL_KEYS) <= s.keys()], sort_keys=True)
            groups.setdefault(key, PointResult(key, {}, config)).summaries.append(s)
    configs = [p.config for p in groups.values()]
    varying = sorted(k for k in defaults if k not in ("seed", "norm", "norm_opts")
                     and len({json.dumps(c[k], sort_keys=True) for c in configs}) > 1)
    rows = []
    for p in groups.values():
        c = p.config
        opts = ", ".join(f"{k}={v}" for k, v in sorted(c["norm_opts"].items()))
        extra = ", ".join(f"{k}={c[k]}" for k in varying)
        label = c["norm"] + (f" ({opts})" if opts else "") + (f" [{extra}]" if extra else "")
        old = not set(PROTOCOL_KEYS) <= p.summaries[0].keys()
        ips = p.values("images_per_sec")
        cells = [fmt(*p.mean_std(k)) for k in PROTOCOL_KEYS] + [fmt(*p.mean_std("test_acc")) if old else "–"]
        cells += [fmt(*p.mean_std(k)) for k in ("train_acc", "train_loss")]
        cells += [f"{sum(ips) / len(ips):,.0f}" if ips else "–"]
        rows.append(f"| {label} | {len(p.finished)} | {' | '.join(cells)} | {p.diverged} |")
    head = ["| config | n | test acc running | test acc precise | " + OLD_ACC
            + " | train acc | train loss | images/s | diverged |", "|---" * 9 + "|"]
    return sum(len(p.summaries) for p in groups.values()), "\n".join(head + sorted(rows)) + "\n"


def protocol_sentence(points: list[PointResult], study: Study) -> str:
    """The README's statement of the eval protocol the answer and figures use."""
    ks = sorted({c.config.precise_stats for c in study.cells})
    k = str(ks[0]) if len(ks) == 1 else f"{ks[0]}–{ks[-1]} (per cell)"
    text = f"**Eval protocol:** {PROTOCOLS[protocol(study)].format(k=k)}, the same for every norm"
    finished = [s for p in points for s in p.finished]
    if not finished:
        return text + "."
    if _protocols_differ(points):
        return text + "; the table shows test accuracy under both protocols."
    if all(not s.get("precise_norms") for s in finished):
        return text + "; no norm here keeps statistics, so both protocols give these numbers."
    return text + "; both protocols gave the same numbers here."


def _activation_note(points: list[PointResult], study: Study) -> list[str]:
    chosen = focus_runs(points, study)
    lacking = [p.key for p, d in chosen if not (d / "activations.pt").is_file()]
    if not lacking:
        return []
    return [(f"Activation figures: {len(lacking)} of the {len(chosen)} chosen run(s) (seed {study.seeds[0]}: "
             f"{', '.join(lacking)}) have no activations.pt (recorded before per-batch activations, or "
             "diverged in their first epoch) and are left out."), ""]


def _results(points: list[PointResult], study: Study) -> list[dict]:
    pairs = kind_of(study).pairs
    compared = pairs(points, study) if pairs else {}
    out = []
    for p in points:
        entry = {"cell": p.key, "labels": p.labels, "config": p.config, "n": len(p.finished),
                 "diverged": p.diverged, "missing": p.missing,
                 "seeds": [seed for seed, s in zip(p.seeds, p.summaries) if s["status"] == "finished"],
                 "protocol": protocol(study), "test_acc": p.values(acc_key(study)),
                 **{k: p.values(k) for k in PROTOCOL_KEYS},
                 "train_acc": p.values("train_acc"), "epoch_time": p.epoch_time()}
        if p.key in compared:
            ref = compared[p.key]
            entry["vs_reference"] = {"reference": ref.key, **difference(p, ref, study).as_dict()}
        out.append(entry)
    return out


# ---------------------------------------------------------------- the report


def make_report(study: Study, runs: Path, out: Path, echo: Callable[[str], None] = print) -> Path:
    """Write ``out/README.md``, ``out/results.json`` and the figures; return the README path."""
    if not runs.is_dir():
        raise StudyError(f"no runs folder {runs}; run the study first: exoticnorm run {study.path}"
                         + (" --quick" if study.quick else ""))
    points = collect(study, runs)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for make in (fig_curves, *kind_of(study).figures, fig_activations, fig_epoch_time):
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
        protocol_sentence(points, study),
        "",
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
        *_activation_note(points, study),
    ]
    md += [f"![{name}]({name})" for name in figures if name.endswith(".png")]
    readme = out / "README.md"
    readme.write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(_results(points, study), indent=2) + "\n")
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
    ``study`` = the study's group), grouped by the grid axes, mean ± std over seeds; test
    accuracy under the study's protocol."""
    from wandb_workspaces import expr

    project = project or os.environ.get("WANDB_PROJECT", "exoticnorm")
    entity = entity or os.environ.get("WANDB_ENTITY", "")
    runset = wr.Runset(entity=entity, project=project, name=study.run_dir_name,
                       filters=[expr.Config("study") == study.run_dir_name], groupby=list(study.axes))
    agg = {"groupby_aggfunc": "mean", "groupby_rangefunc": "stddev"}
    panels = [wr.LinePlot(title=f"{metric} per epoch", x="Step", y=[metric], **agg)
              for metric in (acc_key(study), "train_acc", "train_loss", "epoch_time")]
    if "x" in study.analysis:
        panels.append(wr.ScatterPlot(title=f"test accuracy ({protocol(study)}) vs {study.analysis['x']}",
                                     x=wr.Config(study.analysis["x"]), y=wr.SummaryMetric(acc_key(study)),
                                     log_x=True))
    question = " ".join(study.question.split())
    return wr.Report(project=project, entity=entity, title=f"exoticnorm study: {study.run_dir_name}",
                     description=question, blocks=[wr.H1(text=study.run_dir_name), wr.P(text=question),
                                                   wr.PanelGrid(runsets=[runset], panels=panels)])
