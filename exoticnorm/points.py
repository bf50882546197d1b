"""A study's grid points as the report sees them: the runs of one point over its seeds
(``PointResult``), which test accuracy counts (the eval protocol), and how points group into
facets along an x axis."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .stats import mean_std

if TYPE_CHECKING:
    from .study import Study

__all__ = ["PointResult", "PROTOCOLS", "DEFAULT_PROTOCOL", "ACC_KEYS", "MIN_TRAIN_ACC", "protocol", "acc_key", "facets", "x_of",
           "converged", "short_label", "fmt"]

#: eval protocols: the test accuracy ``test_acc_<protocol>`` of every run (see train.evaluate_both)
PROTOCOLS = {
    "precise": "precise statistics from up to {k} training batches with the final weights",
    "running": "the running statistics as training left them (d2l's evaluation)",
}
DEFAULT_PROTOCOL = "precise"
#: protocol → the run's key of its test accuracy
ACC_KEYS = {name: f"test_acc_{name}" for name in PROTOCOLS}
#: the train-accuracy floor of "converged" when a study does not set analysis.min_train_acc
MIN_TRAIN_ACC = 0.5


def protocol(study: Study) -> str:
    """The study's ``analysis.protocol`` (default DEFAULT_PROTOCOL)."""
    return study.analysis.get("protocol", DEFAULT_PROTOCOL)


def acc_key(study: Study) -> str:
    """The summary/metrics key of the test accuracy the study is answered with."""
    return ACC_KEYS[protocol(study)]


@dataclass
class PointResult:
    """All seeds of one grid point."""

    key: str
    labels: dict[str, str]
    config: dict[str, Any]
    summaries: list[dict] = field(default_factory=list)  # finished or diverged runs
    metrics: list[list[dict]] = field(default_factory=list)  # per run, per epoch
    dirs: list[Path] = field(default_factory=list)  # per run, its folder
    seeds: list[int] = field(default_factory=list)  # per run, its seed
    missing: int = 0  # seeds without a finished run of this cell's settings
    mismatched: int = 0  # of those, folders holding a run made with other settings

    @property
    def finished(self) -> list[dict]:
        return [s for s in self.summaries if s["status"] == "finished"]

    @property
    def diverged(self) -> int:
        return sum(s["status"] == "diverged" for s in self.summaries)

    def values(self, metric: str) -> list[float]:
        """``metric`` of each finished run, in seed order."""
        return [s[metric] for s in self.finished if s.get(metric) is not None]

    def mean_std(self, metric: str) -> tuple[float, float, int]:
        return mean_std(self.values(metric))

    def epoch_time(self) -> float:
        times = [r["epoch_time"] for run in self.metrics for r in run if "epoch_time" in r]
        return statistics.mean(times) if times else math.nan


def facets(points: list[PointResult], study: Study) -> dict[str, list[PointResult]]:
    """Points grouped by their ``analysis.facet`` label (one group "all" without a facet)."""
    facet = study.analysis.get("facet")
    groups: dict[str, list[PointResult]] = {}
    for p in points:
        groups.setdefault(p.labels.get(facet, "all") if facet else "all", []).append(p)
    return groups


def x_of(p: PointResult, study: Study) -> float:
    """The point's ``analysis.x`` setting (lr, batch size)."""
    return float(p.config[study.analysis["x"]])


def converged(p: PointResult, min_train_acc: float) -> bool:
    """Every seed finished, none diverged, each with train accuracy ≥ ``min_train_acc``."""
    return (p.missing == 0 and p.diverged == 0 and bool(p.finished)
            and all(s["train_acc"] >= min_train_acc for s in p.finished))


def short_label(p: PointResult, study: Study) -> str:
    """The point's labels without its facet's (a legend entry inside the facet's panel)."""
    facet = study.analysis.get("facet")
    rest = [label for axis, label in p.labels.items() if axis != facet]
    return "_".join(rest) or p.key


def fmt(mean: float, std: float, n: int, digits: int = 4) -> str:
    """``mean ± std``; the mean alone for one run, – for none."""
    if n == 0:
        return "–"
    if n == 1 or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
