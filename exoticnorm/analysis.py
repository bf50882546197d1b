"""How a study is answered: ``KINDS``, the one table of analysis kinds. study.py checks a
study's ``[analysis]`` against it on loading; report.py takes the answer, the kind's figures
and its comparisons (results.json's ``vs_reference``) from it.

``[analysis]`` keys:

* ``kind = "compare"`` (default): every grid point against ``reference`` (a cell, default the
  first): Δ of the mean test accuracy with Welch's 95% confidence interval (stats.py).
  ``sweeps = [{norm, option}]`` also plots accuracy against a norm option.
* ``kind = "lr"`` (needs ``x``): per ``facet`` value, the largest x whose runs all finished
  with train accuracy ≥ ``min_train_acc`` (default 0.5), and the x with the best test accuracy.
* ``kind = "batch"`` (needs ``x``): per facet value, test accuracy against x; at the smallest
  and largest x each facet value against ``reference`` (a facet label).
* ``protocol = "precise"`` (default) or ``"running"``: which test accuracy answers, the same
  for every norm (``points.PROTOCOLS``).
* ``focus = {axis = label}``: the cells of the activation figures (default: all), first seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .figures import fig_final_vs_x, fig_sweeps
from .points import MIN_TRAIN_ACC, PointResult, acc_key, converged, facets, fmt, protocol, x_of
from .stats import Difference, welch

if TYPE_CHECKING:
    from .study import Study

__all__ = ["Kind", "KINDS", "kind_of", "answer", "difference"]

Answer = Callable[[list[PointResult], "Study"], str]
Figure = Callable[[list[PointResult], "Study", Path], list[str]]
Pairs = Callable[[list[PointResult], "Study"], dict[str, PointResult]]


@dataclass(frozen=True)
class Kind:
    """One kind of analysis."""

    answer: Answer  # the markdown answer from the points (some finished)
    figures: tuple[Figure, ...] = ()  # beyond the ones every study gets
    needs: tuple[str, ...] = ()  # [analysis] keys it requires
    reference_is: str = "cell"  # what analysis.reference names: a cell key, or a facet label
    pairs: Pairs | None = None  # point key → the point it is compared with


def kind_of(study: Study) -> Kind:
    return KINDS[study.analysis.get("kind", "compare")]


def answer(points: list[PointResult], study: Study) -> str:
    """The markdown answer to the study's question, computed from the numbers."""
    if not any(p.finished for p in points):
        return "No finished runs yet: run the study first (`exoticnorm run`).\n"
    return kind_of(study).answer(points, study)


def difference(p: PointResult, ref: PointResult, study: Study) -> Difference:
    """p's test accuracy (the study's protocol) minus ref's, Welch's test (stats.welch)."""
    key = acc_key(study)
    return welch(p.values(key), ref.values(key))


# ---------------------------------------------------------------- compare


def _reference_cell(points: list[PointResult], study: Study) -> PointResult:
    key = study.analysis.get("reference", points[0].key)  # study.load_study checked it is a cell
    return next(p for p in points if p.key == key)


def _cell_pairs(points: list[PointResult], study: Study) -> dict[str, PointResult]:
    """Each point → its reference: the reference cell, or with ``reference = {axis = label}``
    the point with the same labels except ``label`` on ``axis`` (its paired twin)."""
    ref = study.analysis.get("reference")
    if not isinstance(ref, dict):
        cell = _reference_cell(points, study)
        return {p.key: cell for p in points if p is not cell}
    (axis, label), by_labels = next(iter(ref.items())), {tuple(p.labels.items()): p for p in points}
    twins = {p.key: by_labels.get(tuple({**p.labels, axis: label}.items())) for p in points
             if p.labels.get(axis) != label}
    return {k: t for k, t in twins.items() if t is not None}


def _compare(points: list[PointResult], study: Study) -> str:
    key = acc_key(study)
    pairs = _cell_pairs(points, study)
    ranked = sorted((p for p in points if p.finished), key=lambda p: -p.mean_std(key)[0])
    best = ranked[0]
    lines = [f"Highest mean test accuracy ({protocol(study)} statistics): **{best.key}** "
             f"({fmt(*best.mean_std(key))}, n = {len(best.finished)}). "]
    ref = study.analysis.get("reference")
    if isinstance(ref, dict):
        (axis, label), = ref.items()
        lines[0] += (f"Each cell against its twin with {axis} = {label} (the same other settings), "
                     "Δ = mean − mean_twin with Welch's 95% confidence interval:")
    else:
        cell = _reference_cell(points, study)
        lines[0] += (f"Against the reference **{cell.key}** ({fmt(*cell.mean_std(key))}), Δ = mean − "
                     "mean_ref with Welch's 95% confidence interval:")
    lines.append("")
    for p in ranked:
        if p.key not in pairs:
            continue
        ref = pairs[p.key]
        ref_params = ref.finished[0].get("parameters") if ref.finished else None
        params, extra = p.finished[0].get("parameters"), ""
        if params and ref_params and params != ref_params:
            extra = f"; {params - ref_params:+d} parameters ({params} vs {ref_params})"
        vs = f" vs {ref.key}" if isinstance(study.analysis.get("reference"), dict) else ""
        lines.append(f"- {p.key}{vs}: {difference(p, ref, study).text()}{extra}"
                     + (f"; {p.diverged} run(s) diverged" if p.diverged else ""))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- lr


def _lr(points: list[PointResult], study: Study) -> str:
    key = acc_key(study)
    min_acc = float(study.analysis.get("min_train_acc", MIN_TRAIN_ACC))
    lines = [f"Converged = every seed finished without divergence with train accuracy ≥ {min_acc}.", "",
             (f"| {study.analysis.get('facet', 'cells')} | largest converging {study.analysis['x']} | "
              f"best {study.analysis['x']} | test acc ({protocol(study)}) at best | diverged (runs) |"),
             "|---|---|---|---|---|"]
    for facet, group in facets(points, study).items():
        largest = max((x_of(p, study) for p in group if converged(p, min_acc)), default=None)
        scored = [p for p in group if p.finished]
        best = max(scored, key=lambda p: p.mean_std(key)[0]) if scored else None
        lines.append(f"| {facet} | {largest if largest is not None else 'none'} | "
                     f"{x_of(best, study) if best else '–'} | {fmt(*best.mean_std(key)) if best else '–'} | "
                     f"{sum(p.diverged for p in group)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- batch


def _facet_pairs(points: list[PointResult], study: Study) -> dict[str, PointResult]:
    """Each point of the other facet values → the reference facet's point at the same x."""
    groups = facets(points, study)
    at = {x_of(p, study): p for p in groups.get(study.analysis.get("reference"), [])}
    return {p.key: at[x_of(p, study)] for f, group in groups.items() if f != study.analysis.get("reference")
            for p in group if x_of(p, study) in at}


def _batch(points: list[PointResult], study: Study) -> str:
    key, x_name = acc_key(study), study.analysis["x"].replace("_", " ")
    groups, pairs = facets(points, study), _facet_pairs(points, study)
    xs = sorted({x_of(p, study) for p in points})
    lines = [(f"Test accuracy ({protocol(study)} statistics), mean ± std over seeds, per "
              f"{study.analysis.get('facet', 'cell')} (rows) and {x_name} (columns):"), "",
             f"| {study.analysis.get('facet', 'cell')} | " + " | ".join(f"{x:g}" for x in xs) + " |",
             "|---" * (len(xs) + 1) + "|"]
    for facet, group in groups.items():
        by_x = {x_of(p, study): p for p in group}
        lines.append(f"| {facet} | " + " | ".join(
            fmt(*by_x[x].mean_std(key), digits=3) if x in by_x else "–" for x in xs) + " |")
    for x in dict.fromkeys((xs[0], xs[-1])):
        at_x = {f: next((p for p in g if x_of(p, study) == x and p.finished), None) for f, g in groups.items()}
        at_x = {f: p for f, p in at_x.items() if p is not None}
        if not at_x:
            continue
        best = max(at_x, key=lambda f: at_x[f].mean_std(key)[0])
        lines += ["", f"At {x_name} {x:g} the best is **{best}** ({fmt(*at_x[best].mean_std(key))})."]
        lines += [f"- {f} vs {study.analysis['reference']}: {difference(p, pairs[p.key], study).text()}"
                  for f, p in at_x.items() if p.key in pairs]
    return "\n".join(lines) + "\n"


KINDS: dict[str, Kind] = {
    "compare": Kind(_compare, figures=(fig_sweeps,), pairs=_cell_pairs),
    "lr": Kind(_lr, figures=(partial(fig_final_vs_x, boundary=True),), needs=("x",)),
    "batch": Kind(_batch, figures=(fig_final_vs_x,), needs=("x",), reference_is="facet", pairs=_facet_pairs),
}
