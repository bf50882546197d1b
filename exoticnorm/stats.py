"""Statistics over a study's seeds: pure functions of lists of floats.

A grid point's n runs give the mean x̄ and the sample std s = √(Σ(x − x̄)² / (n − 1)).

Two grid points a and b (n_a and n_b runs) differ by Δ = x̄_a − x̄_b. Welch's t-test does not
assume equal variances: the standard error is se = √(v_a + v_b) with v = s²/n, the degrees of
freedom are Welch–Satterthwaite's ν = (v_a + v_b)² / (v_a²/(n_a − 1) + v_b²/(n_b − 1)), the
95% confidence interval of Δ is Δ ± t_0.975(ν)·se and p = 2·P(T_ν > |Δ|/se)
(``scipy.stats.ttest_ind(equal_var=False)`` and its ``confidence_interval``). A difference is
detectable when the interval excludes 0 (equivalently p < 0.05). With one run on a side
there is no sample variance, hence no test.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

__all__ = ["mean_std", "Difference", "welch"]


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(x̄, s, n): s is nan for n = 1, both are nan for n = 0."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    return statistics.mean(values), (statistics.stdev(values) if n > 1 else math.nan), n


@dataclass(frozen=True)
class Difference:
    """Δ = x̄ − x̄_ref with its 95% confidence interval, Welch's p and ν (nan: no test)."""

    delta: float
    ci_low: float
    ci_high: float
    p: float
    df: float
    n: int
    n_ref: int

    @property
    def tested(self) -> bool:
        return self.n >= 2 and self.n_ref >= 2

    def verdict(self) -> str:
        if self.n == 0 or self.n_ref == 0:
            return "not run yet"
        if not self.tested:
            return "one run on a side, no test"
        if self.ci_low <= 0.0 <= self.ci_high:
            return "no detectable difference (the 95% CI contains 0)"
        return "higher" if self.delta > 0 else "lower"

    def text(self) -> str:
        """``Δ = +0.0100, 95% CI [-0.0050, +0.0250], p = 0.17: no detectable difference …``"""
        if self.n == 0 or self.n_ref == 0:
            return self.verdict()
        if not self.tested:
            return f"Δ = {self.delta:+.4f} (n = {self.n} vs {self.n_ref}): {self.verdict()}"
        return (f"Δ = {self.delta:+.4f}, 95% CI [{self.ci_low:+.4f}, {self.ci_high:+.4f}], "
                f"p = {self.p:.2g}: {self.verdict()}")

    def as_dict(self) -> dict[str, float | int | None]:
        """The JSON form: ``delta, ci_low, ci_high, p, n, n_ref`` (null where not tested)."""
        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {"delta": num(self.delta), "ci_low": num(self.ci_low), "ci_high": num(self.ci_high),
                "p": num(self.p), "n": self.n, "n_ref": self.n_ref}


def welch(a: list[float], ref: list[float], level: float = 0.95) -> Difference:
    """Δ = x̄_a − x̄_ref with Welch's ``level`` confidence interval and two-sided p.

    Both sides without spread (s = 0, e.g. every seed stuck at chance) make Δ exact: the
    interval is [Δ, Δ] and p is 1 for Δ = 0, else 0.
    """
    ma, sa, na = mean_std(a)
    mr, sr, nr = mean_std(ref)
    delta = ma - mr
    if na < 2 or nr < 2:
        return Difference(delta, math.nan, math.nan, math.nan, math.nan, na, nr)
    if sa == 0.0 and sr == 0.0:
        return Difference(delta, delta, delta, float(delta == 0.0), math.nan, na, nr)
    from scipy.stats import ttest_ind

    res = ttest_ind(a, ref, equal_var=False)
    ci = res.confidence_interval(confidence_level=level)
    return Difference(delta, float(ci.low), float(ci.high), float(res.pvalue), float(res.df), na, nr)
