"""``exoticnorm paper``: ``paper/paper.md`` and ``paper/paper.pdf`` from the studies' reports.

Inputs: every folder ``STUDIES/NAME/`` with a ``results.json`` written by ``exoticnorm report``
(one entry per grid point: cell, labels, config, n, diverged, missing, protocol, test_acc and
test_acc_running / test_acc_precise per seed, train_acc, epoch_time, vs_reference), its
figures (the PNGs its README.md links), the study file ``STUDIES/NAME.toml`` (question and
analysis) and ``paper/literature.toml`` (what the paper quotes from published work).

Which studies: those whose results.json carries a ``protocol``, all under one protocol (a
mix is a click.ClickException naming who uses which). Reports from before the eval-protocol
pair (no ``protocol`` key) and folders without a report are listed under "Not included" with
the reason and the commands that fix it; with no study left to include the command fails and
says what to run.

No number is typed by hand. Every number printed goes through one ``Ledger`` method, which
returns its text and records where it came from:

* ``num``: a value of a study's results.json (or its .toml) — file, cell (or ``*``: all
  cells), dotted key, operation (value, mean, std, len, sum, min, max, runs) and format;
* ``define``: a constant of the text (the 95% of the confidence intervals), tied to the code
  it comes from (``module:function.parameter`` default);
* ``quote``: numbers inside text quoted from a file (a study's question);
* ``cite``: a claim of ``paper/literature.toml``, quoted from the research notes;
* ``verbatim``: a code span copied from a file (the device line of a report).

``paper/provenance.json`` maps each number as printed to its sources (one entry per
occurrence); ``paper/sources.json`` holds the sha256 of every input read and, when the PDF
was built, of the paper.md and figures it was built from. tests/test_paper.py recomputes
every number from its source and checks the hashes.

The PDF: the markdown is converted to Typst markup here (headings, paragraphs, lists, pipe
tables, images, bold, code, links, and LaTeX-style math of a small subset) and compiled by
the ``typst`` package (``pip install 'exoticnorm[paper]'``), which embeds the PNG figures and
its own fonts.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["NUMBER", "Ledger", "StudyData", "find_studies", "render", "write_paper", "to_typst",
           "latex_to_typst", "compute"]

#: what counts as a number in the paper: percentages and numbers with a decimal point
#: (optionally signed, optionally with an exponent); integers are not scanned.
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?%|(?<![\w.])[-+−]?\d+\.\d+(?:e[-+]?\d+)?")
PROTOCOL_KEYS = {"precise": "test_acc_precise", "running": "test_acc_running"}

#: said wherever old-format studies are listed: `exoticnorm run` skips finished runs, and
#: `exoticnorm report` refuses runs recorded before the protocol pair (report.collect)
RUNS_NOTE = ("Runs recorded before the protocol pair (in runs/studies/NAME) are refused by `exoticnorm report`, "
             "which says how to move them aside before re-running.")
LITERATURE = Path(__file__).resolve().parent.parent / "paper" / "literature.toml"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), root)).as_posix()


# ---------------------------------------------------------------- provenance


def _get(doc: Any, key: str) -> Any:
    for part in key.split("."):
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def compute(doc: Any, cell: str | None, key: str, op: str) -> Any:
    """The value of ``key`` in ``doc`` (a results.json list, or a .toml dict when cell is None)
    after ``op``; cell ``*``: the key of every cell, as a list."""
    if cell is None:
        value = _get(doc, key)
    elif cell == "*":
        value = [_get(c, key) for c in doc]
    else:
        entry = next(c for c in doc if c["cell"] == cell)
        if op == "runs":  # the planned seeds of a cell: finished + diverged + not run
            return entry["n"] + entry["diverged"] + entry["missing"]
        value = _get(entry, key)
    ops = {"value": lambda v: v, "mean": statistics.mean, "std": statistics.stdev, "len": len,
           "sum": sum, "min": min, "max": max}
    return ops[op](value)


_HOW = {"value": "{key} of {cells}", "mean": "mean of {key} of {cells}", "std": "sample std of {key} of {cells}",
        "len": "length of {key}", "sum": "sum of {key} over {cells}", "min": "minimum of {key} over {cells}",
        "max": "maximum of {key} over {cells}", "runs": "planned runs of {cells}: n + diverged + missing"}


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        raise ValueError("nan is not a number to print")
    return format(value, spec)


@dataclass
class Ledger:
    """Every number of the paper, as printed → where it came from (one entry per use)."""

    root: Path
    numbers: dict[str, list[dict]] = field(default_factory=dict)
    verbatims: list[dict] = field(default_factory=list)

    def _add(self, text: str, source: dict) -> str:
        self.numbers.setdefault(text, []).append(source)
        return text

    def num(self, study: StudyData, cell: str | None, key: str, op: str = "value",
            fmt: str = ".4f", how: str = "") -> str:
        """A number of the study's results.json (cell given) or study file (cell None)."""
        doc, path = (study.cells, study.results_path) if cell is not None else (study.spec, study.toml_path)
        text = _fmt(compute(doc, cell, key, op), fmt)
        where = "every cell" if cell == "*" else "the cell"
        return self._add(text, {"kind": "data", "file": _rel(path, self.root), "study": study.name,
                                "cell": cell, "key": key, "op": op, "format": fmt,
                                "how": how or _HOW[op].format(key=key, cells=where)})

    def define(self, text: str, meaning: str, code: str | None = None, scale: float = 1.0,
               fmt: str = "g", suffix: str = "") -> str:
        """A constant of the text; with ``code`` (``module:function.parameter``) its value is
        that default × scale, printed with fmt and suffix, and checked here."""
        if code is not None:
            value = _code_default(code) * scale
            if _fmt(value, fmt) + suffix != text:
                raise ValueError(f"definition {text!r} is {_fmt(value, fmt) + suffix!r} in {code}")
        return self._add(text, {"kind": "definition", "meaning": meaning,
                                **({"code": code, "scale": scale, "format": fmt, "suffix": suffix}
                                   if code else {})})

    def quote(self, text: str, path: Path, key: str) -> str:
        """Text quoted from a file (``key``: a dotted key of a .toml); its numbers are recorded."""
        for m in NUMBER.finditer(text):
            self._add(m.group(), {"kind": "quote", "file": _rel(path, self.root), "key": key})
        return text

    def cite(self, claim: dict, path: Path) -> str:
        """A claim of literature.toml, its numbers filled in; each is recorded."""
        stray = NUMBER.findall(re.sub(r"\{\d+\}", "", claim["text"]))
        if stray:
            raise ValueError(f"literature claim {claim['id']}: number(s) {stray} typed into its text; "
                             "put them in its numbers")
        nums = []
        for n in claim["numbers"]:
            if n not in claim["quote"]:
                raise ValueError(f"literature claim {claim['id']}: {n} is not in its quote")
            nums.append(self._add(n, {"kind": "literature", "file": _rel(path, self.root),
                                      "claim": claim["id"], "cite": claim["cite"]}))
        return claim["text"].format(*nums)

    def verbatim(self, text: str, path: Path) -> str:
        """A code span copied from a file (its numbers are not scanned, the copy is checked)."""
        self.verbatims.append({"text": text, "file": _rel(path, self.root)})
        return f"`{text}`"

    def as_json(self, out: Path) -> dict:
        return {"root": _rel(self.root, out.resolve()), "numbers": self.numbers,
                "verbatim": self.verbatims}


def _code_default(code: str) -> float:
    module, _, attr = code.partition(":")
    func, _, param = attr.rpartition(".")
    obj = importlib.import_module(module)
    for part in func.split("."):
        obj = getattr(obj, part)
    return inspect.signature(obj).parameters[param].default


# ---------------------------------------------------------------- the studies


@dataclass
class StudyData:
    name: str
    dir: Path
    results_path: Path | None
    toml_path: Path | None
    cells: list[dict]
    spec: dict
    protocol: str | None
    figures: list[Path]
    readme: str

    @property
    def analysis(self) -> dict:
        return self.spec.get("analysis", {})

    def cell(self, key: str) -> dict:
        return next(c for c in self.cells if c["cell"] == key)


@dataclass
class Excluded:
    name: str
    reason: str
    fix: list[str]


def _figures(folder: Path, readme: str) -> list[Path]:
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", readme)
    names = linked or sorted(p.name for p in folder.glob("*.png"))
    return [folder / n for n in dict.fromkeys(names) if (folder / n).is_file()]


def _commands(studies: Path, name: str, root: Path) -> list[str]:
    toml = _rel(studies / f"{name}.toml", root)
    return [f"exoticnorm run {toml} --jobs 2", f"exoticnorm report {toml}"]


def find_studies(studies: Path, root: Path) -> tuple[list[StudyData], list[Excluded]]:
    """The reports in ``studies`` that carry a protocol, and the rest with the reason."""
    names = sorted({p.parent.name for p in studies.glob("*/results.json")}
                   | {p.stem for p in studies.glob("*.toml")}
                   | {p.name for p in studies.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))})
    found, excluded = [], []
    for name in names:
        folder, toml = studies / name, studies / f"{name}.toml"
        results = folder / "results.json"
        fix = _commands(studies, name, root) if toml.is_file() else []
        if not results.is_file():
            why = ("no report yet (no results.json)" if toml.is_file() else
                   "no results.json and no study file: not a report of `exoticnorm report`")
            excluded.append(Excluded(name, why, fix))
            continue
        try:
            cells = json.loads(results.read_text())
        except json.JSONDecodeError as exc:
            excluded.append(Excluded(name, f"results.json is not valid JSON ({exc})", fix))
            continue
        if not (isinstance(cells, list) and cells and all(isinstance(c, dict) and "cell" in c for c in cells)):
            excluded.append(Excluded(name, "results.json is not a list of study cells: not a report of "
                                           "`exoticnorm report`", fix))
            continue
        protocols = {c.get("protocol") for c in cells}
        if None in protocols:
            excluded.append(Excluded(name, "reported before the eval-protocol pair (results.json has no "
                                           "`protocol`): the old per-norm protocol, not comparable", fix))
            continue
        if len(protocols) != 1:
            raise click.ClickException(f"{_rel(results, root)} mixes protocols {sorted(protocols)} within one "
                                       f"study; re-report it: exoticnorm report {_rel(toml, root)}")
        if not toml.is_file():
            excluded.append(Excluded(name, f"no study file {_rel(toml, root)} (its question and analysis)", []))
            continue
        spec = tomllib.loads(toml.read_text())
        protocol = protocols.pop()
        wanted = spec.get("analysis", {}).get("protocol")
        if wanted is not None and wanted != protocol:
            excluded.append(Excluded(name, f"the report uses the {protocol} protocol but {_rel(toml, root)} now "
                                           f"asks for {wanted}: the report is stale",
                                     [f"exoticnorm report {_rel(toml, root)}"]))
            continue
        readme = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
        found.append(StudyData(name, folder, results, toml, cells, spec, protocol, _figures(folder, readme), readme))
    return found, excluded


def _check_protocols(found: list[StudyData], excluded: list[Excluded], studies: Path, root: Path) -> str:
    if not found and not excluded:
        raise click.ClickException(f"no study in {studies}: no NAME.toml and no NAME/results.json there "
                                   "(--studies names the folder of study files and their reports)")
    if not found:
        lines = [f"no study in {_rel(studies, root)}/ has a report with an eval protocol (results.json "
                 "with `protocol`), so there is nothing to put in the paper. Run and report them:"]
        for e in excluded:
            lines.append(f"  {e.name}: {e.reason}" + (f"\n    {' && '.join(e.fix)}" if e.fix else ""))
        lines.append(RUNS_NOTE)
        raise click.ClickException("\n".join(lines))
    by = {}
    for s in found:
        by.setdefault(s.protocol, []).append(s.name)
    if len(by) > 1:
        uses = "; ".join(f"{p}: {', '.join(names)}" for p, names in sorted(by.items()))
        raise click.ClickException(
            f"the reports use different eval protocols ({uses}); the paper compares studies under one. "
            "Set analysis.protocol in the studies' .toml to one protocol and re-report them "
            "(exoticnorm report studies/NAME.toml; the runs record both protocols, no re-run needed).")
    return next(iter(by))


# ---------------------------------------------------------------- the text


INTRO = r"""Batch normalization standardizes every channel with the mean and variance of the batch. The
exercises of d2l's chapter on batch normalization [d2l] end with research ideas, four of which
this library implements as layers and its studies measure:

- **Can the probability integral transform serve as a norm?** (exercise 7, idea 1) Push every
  channel through its own CDF, so that the output is uniform, or normal after $\Phi^{-1}$.
- **Can one use a full-rank covariance estimate?** (idea 2) d2l asks this together with why one
  "should probably not" do it, and leaves the why to the reader. The reasons we found
  (research notes, with their sources): with fewer samples than channels the batch covariance
  has rank at most $n - 1$, so exact whitening is impossible and every implementation adds a
  ridge; gradients through an eigendecomposition divide by differences of eigenvalues and are
  NaN where eigenvalues repeat (torch issues 47599 and 76531); and the $C \times C$
  decomposition costs more than per-channel standardization: DBN [dbn] whitens groups of 16
  channels, IterNorm [iternorm] groups of 64, and IterNorm's README notes that BN runs as one
  fused cuDNN kernel and IterNorm does not.
- **Can one use compact matrix variants** (block-diagonal, low displacement rank, Monarch)?
  (idea 3)
- **Does a sparsification compression act as a regularizer?** (idea 4)

The same exercises ask whether the bias before a norm is needed, how large the learning rate
can get, whether every layer needs a norm, whether BN replaces dropout and whether the learned
scale and shift are needed; fastai's lessons ask how the per-sample norms hold up at small
batches. Each question is one study: a grid of runs over seeds whose report (`exoticnorm
report`) is the source of every number below."""

METHODS = r"""Every norm maps an input $x$ of shape $(N, C, \ldots)$ to $y$ of the same shape, with
statistics over every axis but the channel axis ($M$ values per channel), a learned per-channel
scale $\gamma$ and shift $\beta$, and a ridge $\epsilon$. Norms with batch statistics keep running
averages, $r \leftarrow (1 - m) r + m s$ with momentum $m$, for evaluation.

### Batch normalization and the lite variants

BN [bn]: $y = \gamma \odot (x - \mu_B) / \sqrt{\sigma_B^2 + \epsilon} + \beta$ with the batch mean
$\mu_B$ and biased variance $\sigma_B^2$. d2l's lite variants drop one half: mean-only
(`bn-mean`) $y = \gamma \odot (x - \mu_B) + \beta$, variance-only (`bn-var`)
$y = \gamma \odot x / \sqrt{\sigma_B^2 + \epsilon} + \beta$; `bn-frozen` fixes $\gamma = 1$,
$\beta = 0$ and keeps the statistics. `gn`, `ln` and `in` standardize per sample over channel
groups, all channels, or each channel; `running-bn` is fastai's small-batch norm.

### Whitening: ZCA, Cholesky and PCA

Per group of $c$ channels, the batch covariance $\Sigma = \frac{1}{M} \sum_k (x_k - \mu)(x_k - \mu)^\top$
is shrunk toward its mean variance, $\Sigma_\rho = (1 - \rho) \Sigma + \rho \, m I$ with
$m = \operatorname{tr}(\Sigma) / c$ and Ledoit–Wolf's $\rho$ [lw] when a group sees fewer than
$4 c$ samples (else $\rho = 0$). With $\Sigma_\rho = U \operatorname{diag}(\lambda) U^\top$, ZCA whitening
[dbn] is

$$
W = U \operatorname{diag}((\lambda + \epsilon)^{-1/2}) U^\top, \quad y = \gamma \odot W (x - \mu) + \beta .
$$

Any $W$ with $W \Sigma W^\top = I$ whitens; ZCA's is the symmetric one, closest to the identity
[kessy]. The library also offers Cholesky whitening [wmse], $W = L^{-1}$ with
$\Sigma_\rho + \epsilon I = L L^\top$, and PCA whitening, $W = \operatorname{diag}((\lambda + \epsilon)^{-1/2}) U^\top$
with descending eigenvalues and each eigenvector's largest entry made positive.

The backward is the library's own (`exoticnorm/whitening.py`). The large tensors get
hand-written passes, and the small map $(\Sigma, \gamma, \beta) \to (W, b)$ is differentiated
separately; the derivative of $\Sigma^{-1/2}$ is the Daleckii–Krein form written in closed form,
$\bar\Sigma = U (K \odot U^\top \bar G U) U^\top$ with $\bar G$ the symmetric part of
$\partial L / \partial W$ and $K_{ij} = -1 / (s_i s_j (s_i + s_j))$, $s_i = \sqrt{\lambda_i}$: there is
no division by $\lambda_i - \lambda_j$, so repeated or nearly equal eigenvalues give finite, exact
gradients. It is not twice differentiable, and says so instead of returning a wrong second
derivative.

### Compact whitening: block-diagonal, sparse, Monarch, circulant

`block-zca` whitens groups of $c$ consecutive channels on their own ($c = 1$ is BN, $c = C$ is
ZCA). `sparse-zca` keeps the largest fraction $d$ of the off-diagonal entries of $W$ and rescales
each row to unit output variance, $W_s \leftarrow \operatorname{diag}(W_s \Sigma W_s^\top)^{-1/2} W_s$
($d = 0$ is per-channel standardization, $d = 1$ is ZCA), or thresholds the correlations
(Bickel–Levina [bl]) and whitens those. `monarch-zca` is a Monarch-style product [monarch]
$W = P^\top B_2 P B_1$ of two block-whitening stages with a stride permutation $P$ between them,
$O(C^{3/2})$ per sample at blocks of $\sqrt{C}$; it whitens fully only within each second-stage
block. `circulant-zca` assumes a circulant covariance, diagonalized by the DFT over channels:
$W = F^{-1} \operatorname{diag}((\lambda + \epsilon)^{-1/2}) F$ with $\lambda$ the mean power spectrum over
channels, $O(C \log C)$ per sample and no eigendecomposition.

### Group and switchable whitening

Group whitening [gw] is per sample: the sample's values form a $g \times m$ matrix $X$ of channel
groups, each row is centred and the rows are decorrelated, $\hat X = \Sigma_n^{-1/2} (X - \mu 1^\top)$;
nothing depends on the batch. Switchable whitening [sw] whitens with learned softmax mixtures
$\hat\mu = \sum_k \omega_k \mu_k$ and $\hat\Sigma = \sum_k \omega'_k \Sigma_k$ of batch and instance
whitening and BN, IN and LN statistics.

### PIT norm and the running quantile sketch

The PIT norm maps every channel through its CDF: $y = \gamma \odot g(F(x)) + \beta$ with $g$ the
identity (uniform output) or $\Phi^{-1}$ on $F$ clipped to $[t, 1 - t]$ (normal output). In
training $F$ is the batch's CDF on the grid of a running sketch, piecewise linear over pieces of
about $s$ values each, so its slope, the gradient, stays bounded in channels with few values;
ties (the zeros after a ReLU) take their mid-rank. The sketch keeps per channel a CDF on $K$ bins
in the squashed coordinate $u = (1 + z / (1 + |z|)) / 2$, $z = (x - c) / h$, updated by averaging
batch CDFs at shared knots (with a momentum, or cumulatively, then exactly the pooled CDF), and
re-gridded when the centre or scale moves. Sketches on one grid merge exactly by adding counts,
so processes sum theirs. In eval, $F$ comes from the sketch with graded tails."""

LITERATURE_TEXT = r"""Ness et al. [ness] Gaussianized hidden activations through estimated CDFs and report that
it "proves to be ineffective"; this library's PIT norm exists to test that claim on d2l's
setting. The whitening family reports gains on large ImageNet ResNets: DBN [dbn] (ZCA via
SVD, groups of 16 channels), IterNorm [iternorm] (Newton–Schulz iterations
instead of an eigendecomposition), Switchable Whitening [sw] and Group Whitening [gw]; the
research notes add that the reported gains mostly come from whitening one or two layers (the
stem, the layer before the classifier)."""


def _maybe(doc: Any, key: str) -> Any:
    try:
        return _get(doc, key)
    except (KeyError, IndexError):
        return None


def _cells_str(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names) if names else "none"


class Writer:
    """The paper's markdown, built from the studies through one Ledger."""

    def __init__(self, studies: Path, link_dir: Path, root: Path, found: list[StudyData],
                 excluded: list[Excluded], protocol: str, literature: Path) -> None:
        # link_dir: where paper.md will be read from (figure links, the --out of the commands)
        self.studies, self.out, self.link_dir, self.root = studies, link_dir, link_dir, root
        self.found, self.excluded, self.protocol = found, excluded, protocol
        self.lit_path = literature
        self.lit = tomllib.loads(literature.read_text())
        self.claims = {c["id"]: c for c in self.lit.get("claim", [])}
        self.ledger = Ledger(root)
        self.L = self.ledger

    # -- small pieces

    def ci_level(self) -> str:
        return self.L.define("95%", "confidence level of Welch's intervals (stats.welch level)",
                             code="exoticnorm.stats:welch.level", scale=100, suffix="%")

    def mean_std(self, s: StudyData, cell: str, key: str, digits: int = 4) -> str:
        c = s.cell(cell)
        values = c.get(key) or []
        if not values:
            return "–"
        mean = self.L.num(s, cell, key, "mean", f".{digits}f", f"mean over seeds of {key}")
        if len(values) < 2:
            return mean
        return f"{mean} ± {self.L.num(s, cell, key, 'std', f'.{digits}f', f'sample std over seeds of {key}')}"

    def delta(self, s: StudyData, cell: str) -> tuple[str, str, str]:
        vs = s.cell(cell).get("vs_reference") or {}
        d = self.L.num(s, cell, "vs_reference.delta", fmt="+.4f") if vs.get("delta") is not None else "–"
        if vs.get("ci_low") is None:
            return d, "–", "–"
        ci = (f"[{self.L.num(s, cell, 'vs_reference.ci_low', fmt='+.4f')}, "
              f"{self.L.num(s, cell, 'vs_reference.ci_high', fmt='+.4f')}]")
        return d, ci, self.L.num(s, cell, "vs_reference.p", fmt=".2g")

    def acc_key(self) -> str:
        return PROTOCOL_KEYS[self.protocol]

    def other_protocol(self, s: StudyData) -> str | None:
        """The other protocol's key when its values differ anywhere in the study."""
        other = next(k for p, k in PROTOCOL_KEYS.items() if p != self.protocol)
        return other if any(c.get(other) != c.get("test_acc") for c in s.cells) else None

    def verdict(self, s: StudyData) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {"higher": [], "lower": [], "no detectable difference": [],
                                        "not tested (one run on a side)": []}
        for c in s.cells:
            vs = c.get("vs_reference")
            if not vs or not c["n"]:
                continue
            if vs.get("ci_low") is None:
                groups["not tested (one run on a side)"].append(c["cell"])
            elif vs["ci_low"] > 0:
                groups["higher"].append(c["cell"])
            elif vs["ci_high"] < 0:
                groups["lower"].append(c["cell"])
            else:
                groups["no detectable difference"].append(c["cell"])
        return groups

    def ranked(self, s: StudyData) -> list[dict]:
        return sorted((c for c in s.cells if c.get("test_acc")), key=lambda c: -statistics.mean(c["test_acc"]))

    def values(self, s: StudyData, key: str, fmt: str = "g", many: int = 3) -> str:
        """The distinct values of config ``key`` over the study's cells: each, or min–max."""
        vals = [_maybe(c, key) for c in s.cells]
        distinct = list(dict.fromkeys(v for v in vals if v is not None))
        if not distinct:
            return "all" if key == "config.limit_train" else "–"
        if len(distinct) > many and all(isinstance(v, (int, float)) for v in distinct):
            return f"{self.L.num(s, '*', key, 'min', fmt)}–{self.L.num(s, '*', key, 'max', fmt)}"
        out = []
        for v in distinct:
            first = next(c["cell"] for c in s.cells if _maybe(c, key) == v)
            out.append(self.L.num(s, first, key, "value", fmt) if isinstance(v, (int, float)) and
                       not isinstance(v, bool) else str(v))
        return ", ".join(out) + (" or all" if None in vals and key == "config.limit_train" else "")

    def study_ref(self, s: StudyData) -> str:
        return f"`{s.name}`"

    # -- sections

    def abstract(self) -> list[str]:
        norms = sorted({c["config"].get("norm") for s in self.found for c in s.cells} - {None})
        n = len(self.found)
        text = (f"We train small networks on FashionMNIST with the normalization layers {_cells_str(norms)} "
                f"in {n} {'study' if n == 1 else 'studies'}, each a grid of settings over seeds, every test "
                f"accuracy evaluated "
                f"under one protocol ({self.protocol} statistics). For each cell we give the mean and sample "
                f"standard deviation over seeds and, against the study's reference, the difference of means "
                f"with Welch's {self.ci_level()} confidence interval. Per study, the finished runs and the "
                f"cell with the best mean test accuracy:")
        lines = [text, ""]
        for s in self.found:
            runs = self.L.num(s, "*", "n", "sum", "d", "finished runs (sum of n over cells)")
            best = self.ranked(s)
            if not best:
                lines.append(f"- {self.study_ref(s)} ({runs} runs): no finished run yet.")
                continue
            lines.append(f"- {self.study_ref(s)} ({runs} runs): `{best[0]['cell']}`, "
                         f"{self.mean_std(s, best[0]['cell'], 'test_acc')}.")
        if self.excluded:
            lines += ["", f"Not included: {len(self.excluded)} folder(s) of the studies directory "
                          f"({', '.join(f'`{e.name}`' for e in self.excluded)}); see the section Not included."]
        return ["## Abstract", "", *lines, ""]

    def intro(self) -> list[str]:
        lines = ["## Introduction", "", INTRO, ""]
        norms = {s.name: {c["config"].get("norm") for c in s.cells} for s in self.found}
        topics = [("the PIT norm", {"pit"}), ("full-rank whitening", {"zca"}),
                  ("compact whitening", {"block-zca", "monarch-zca", "circulant-zca"}),
                  ("sparsified whitening", {"sparse-zca"})]
        lines.append("Which included studies hold cells for the research ideas:")
        lines.append("")
        for topic, wanted in topics:
            where = [n for n, have in norms.items() if have & wanted]
            lines.append(f"- {topic}: {', '.join(f'`{w}`' for w in where) or 'no included study'}.")
        return lines + [""]

    def methods(self) -> list[str]:
        return ["## Methods", "", METHODS, ""]

    def protocol_section(self) -> list[str]:
        from .points import PROTOCOLS

        lines = ["## Protocol", "",
                 "Data: FashionMNIST (`exoticnorm/data.py`), the training images per epoch as the configs "
                 "set them (all, or the first N), evaluated on the test set. The settings below are read "
                 "from the configs recorded in each study's results.json.", "",
                 "| study | model | norm sites | activation | optimizer | lr | batch size | weight decay "
                 "| epochs | training images | seeds |", "|---" * 11 + "|"]
        for s in self.found:
            limit = self.values(s, "config.limit_train", "d")
            lines.append(
                f"| {self.study_ref(s)} | {self.values(s, 'config.model')} | {self.values(s, 'config.norm_layers')} "
                f"| {self.values(s, 'config.activation')} | {self.values(s, 'config.optimizer')} "
                f"| {self.values(s, 'config.lr')} | {self.values(s, 'config.batch_size', 'd')} "
                f"| {self.values(s, 'config.weight_decay')} | {self.values(s, 'config.epochs', 'd')} "
                f"| {limit} | {self.L.num(s, s.cells[0]['cell'], '', 'runs', 'd')} |")
        text = PROTOCOLS[self.protocol].format(k="K")
        if self.protocol == "precise":
            ks = ", ".join(self.values(s, "config.precise_stats", "d") for s in self.found)
            text += f" (as in [precise]; K = {ks}, per study in the order above)"
        lines += ["", f"Evaluation: every norm in every study is evaluated the same way, with {text}. "
                      "Optimizers: `sgd` is plain SGD, `momentum` SGD with momentum (`exoticnorm/train.py`).", "",
                  f"Statistics: mean ± sample standard deviation over the finished seeds (n); Δ = mean − "
                  f"mean of the reference, with Welch's t-test [welch] (unequal variances, Welch–Satterthwaite "
                  f"degrees of freedom), its {self.ci_level()} confidence interval and two-sided p "
                  "(`exoticnorm/stats.py`). A difference is called detectable when the interval excludes "
                  "zero; with one run on a side there is no test. No correction for multiple comparisons.", ""]
        return lines

    def results(self) -> list[str]:
        lines = ["## Results", ""]
        for s in self.found:
            lines += self.study_section(s)
        return lines

    def study_section(self, s: StudyData) -> list[str]:
        question = " ".join(s.spec.get("question", "").split())
        kind = s.analysis.get("kind", "compare")
        lines = [f"### Study {self.study_ref(s)}", "",
                 f"**Question.** {self.L.quote(question, s.toml_path, 'question')}", ""]
        missing = sum(c["missing"] for c in s.cells)
        diverged = sum(c["diverged"] for c in s.cells)
        status = (f"Runs: {self.L.num(s, '*', 'n', 'sum', 'd')} finished, "
                  f"{self.L.num(s, '*', 'diverged', 'sum', 'd')} diverged")
        if missing:
            status += f", **{self.L.num(s, '*', 'missing', 'sum', 'd')} not run yet** (partial study)"
        lines += [status + f"; test accuracy under the {s.protocol} protocol"
                  + ("; diverged runs are not in the means" if diverged else "") + ".", ""]
        if kind in ("lr", "batch") and "x" in s.analysis and "facet" in s.analysis:
            lines += self.pivot(s, self.acc_key(), f"Test accuracy ({s.protocol})")
            other = self.other_protocol(s)
            if other:
                lines += self.pivot(s, other, f"Test accuracy ({other.removeprefix('test_acc_')}, for comparison)")
            if kind == "lr":
                lines += self.convergence(s)
            else:
                lines += self.delta_table(s)
        else:
            lines += self.compare_table(s)
        lines += self.figures(s)
        return lines

    def compare_table(self, s: StudyData) -> list[str]:
        other = self.other_protocol(s)
        ref = s.analysis.get("reference", s.cells[0]["cell"])
        head = ["cell", "n", "diverged", f"test acc ({s.protocol})"]
        if other:
            head.append(f"test acc ({other.removeprefix('test_acc_')})")
        head += ["train acc", f"Δ vs `{ref}`", f"{self.ci_level()} CI", "p"]
        lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for c in s.cells:
            k = c["cell"]
            row = [f"`{k}`", f"{self.L.num(s, k, 'n', fmt='d')}/{self.L.num(s, k, '', 'runs', 'd')}",
                   self.L.num(s, k, "diverged", fmt="d"), self.mean_std(s, k, "test_acc")]
            if other:
                row.append(self.mean_std(s, k, other))
            row.append(self.mean_std(s, k, "train_acc"))
            row += list(self.delta(s, k)) if c.get("vs_reference") else ["reference" if k == ref else "–", "", ""]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        groups = self.verdict(s)
        if any(groups.values()):
            lines.append(f"Against `{ref}` ({self.ci_level()} CI of Δ): "
                         + "; ".join(f"{name}: {_cells_str(cells)}" for name, cells in groups.items() if cells) + ".")
            lines.append("")
        return lines

    def pivot(self, s: StudyData, key: str, title: str) -> list[str]:
        x, facet = s.analysis["x"], s.analysis["facet"]
        xs = sorted({c["config"][x] for c in s.cells})
        rows = list(dict.fromkeys(c["labels"][facet] for c in s.cells))
        heads = [self.L.num(s, next(c["cell"] for c in s.cells if c["config"][x] == v), f"config.{x}", fmt="g")
                 for v in xs]
        lines = [f"{title}, mean ± std over seeds; rows: {facet}, columns: {x.replace('_', ' ')}.", "",
                 f"| {facet} | " + " | ".join(heads) + " |", "|---" * (len(xs) + 1) + "|"]
        for r in rows:
            by_x = {c["config"][x]: c for c in s.cells if c["labels"][facet] == r}
            lines.append(f"| `{r}` | " + " | ".join(
                self.mean_std(s, by_x[v]["cell"], key, digits=3) if v in by_x else "–" for v in xs) + " |")
        return lines + [""]

    def convergence(self, s: StudyData) -> list[str]:
        x, facet = s.analysis["x"], s.analysis["facet"]
        if "min_train_acc" in s.analysis:
            floor = s.analysis["min_train_acc"]
            floor_text = self.L.num(s, None, "analysis.min_train_acc", fmt="g")
        else:  # the default of analysis._lr
            floor, floor_text = 0.5, self.L.define("0.5", "default of analysis.min_train_acc (exoticnorm/analysis.py)")
        lines = [f"Converged = every planned seed finished, none diverged, train accuracy ≥ {floor_text} in "
                 "each. Per " + facet + ":", "",
                 f"| {facet} | largest converging {x} | best {x} | test acc at best |", "|---|---|---|---|"]
        for r in dict.fromkeys(c["labels"][facet] for c in s.cells):
            group = [c for c in s.cells if c["labels"][facet] == r]
            ok = [c for c in group if c["missing"] == 0 and c["diverged"] == 0 and c["n"] > 0
                  and all(a >= floor for a in c["train_acc"])]
            largest = max(ok, key=lambda c: c["config"][x], default=None)
            scored = [c for c in group if c.get("test_acc")]
            best = max(scored, key=lambda c: statistics.mean(c["test_acc"]), default=None)
            lines.append(
                f"| `{r}` | {self.L.num(s, largest['cell'], f'config.{x}', fmt='g') if largest else 'none'} | "
                f"{self.L.num(s, best['cell'], f'config.{x}', fmt='g') if best else '–'} | "
                f"{self.mean_std(s, best['cell'], 'test_acc') if best else '–'} |")
        return lines + [""]

    def delta_table(self, s: StudyData) -> list[str]:
        facet, ref = s.analysis["facet"], s.analysis.get("reference")
        compared = [c for c in s.cells if c.get("vs_reference")]
        if not compared:
            return []
        lines = [f"Each {facet} against `{ref}` at the same {s.analysis['x'].replace('_', ' ')} "
                 f"(Δ of mean test accuracy, Welch's {self.ci_level()} CI, p):", "",
                 "| cell | Δ | CI | p |", "|---|---|---|---|"]
        for c in compared:
            d, ci, p = self.delta(s, c["cell"])
            lines.append(f"| `{c['cell']}` | {d} | {ci} | {p} |")
        return lines + [""]

    def figures(self, s: StudyData) -> list[str]:
        lines = []
        for fig in s.figures:
            link = Path(os.path.relpath(fig.resolve(), self.link_dir.resolve())).as_posix()
            lines += [f"![{s.name}: {fig.stem.replace('_', ' ')}]({link})", ""]
        return lines

    def literature(self) -> list[str]:
        lines = ["## Relation to the literature", "", LITERATURE_TEXT, ""]
        lines.append(f"Numbers the papers or their code report (quoted from the research notes): "
                     f"{self.L.cite(self.claims['gw-imagenet'], self.lit_path)} [gw]; "
                     f"{self.L.cite(self.claims['sw-imagenet'], self.lit_path)} [sw]; with power-iteration SVD, "
                     f"{self.L.cite(self.claims['pi-svd-cifar'], self.lit_path)} [pisvd]. For scale: "
                     f"{self.L.cite(self.claims['d2l-bn-lenet'], self.lit_path)} [d2l].")
        lines.append("")
        families = [("PIT", {"pit"}), ("whitening", {"zca", "block-zca", "sparse-zca", "monarch-zca",
                                                     "circulant-zca", "group-whitening", "switchable-whitening"})]
        for name, norms in families:
            rows = []
            for s in self.found:
                for c in s.cells:
                    if c["config"].get("norm") in norms and c.get("vs_reference") and c["n"]:
                        d, ci, p = self.delta(s, c["cell"])
                        ref = c["vs_reference"].get("reference", s.analysis.get("reference"))
                        rows.append(f"| {self.study_ref(s)} | `{c['cell']}` | `{ref}` | {d} | {ci} | {p} |")
            if rows:
                lines += [f"Here, on LeNet and FashionMNIST, the {name} cells against their study's reference "
                          f"(Δ of mean test accuracy, {self.ci_level()} CI, p):", "",
                          "| study | cell | reference | Δ | CI | p |", "|---|---|---|---|---|---|", *rows, ""]
            else:
                lines += [f"No included study has {name} cells compared with a reference.", ""]
        return lines

    def limitations(self) -> list[str]:
        models = sorted({c["config"].get("model", "lenet") for s in self.found for c in s.cells})
        lines = ["## Limitations", "",
                 f"Scale: one small data set (FashionMNIST) and the models {_cells_str(models)} (LeNet is d2l's; "
                 "the library's ResNets for 28×28 are narrow), a few seeds per cell, so Welch's test has little "
                 "power and small differences go undetected; no correction for the many comparisons. "
                 "Epoch budgets are short and differ between studies (epochs per study: "
                 + ", ".join(f"{self.study_ref(s)} {self.values(s, 'config.epochs', 'd')}" for s in self.found)
                 + "); results at these budgets need not hold for longer training or for ImageNet-scale "
                 "networks, where the whitening papers report their gains.", ""]
        envs = []
        for s in self.found:
            m = re.search(r"; ((?:cpu|cuda|mps)[^;]*?)\. Mean ± ", s.readme)
            if m:
                envs.append(f"{self.study_ref(s)} {self.L.verbatim(m.group(1), s.dir / 'README.md')}")
        lines += ["Compute: as the reports record it, " + ("; ".join(envs) if envs else "not recorded")
                  + ". The studies were sized to fit a 2-core CPU, which bounds every choice above.", ""]
        partial = [s for s in self.found if any(c["missing"] for c in s.cells)]
        if partial:
            lines += [f"Partial studies (runs not run yet): {', '.join(map(self.study_ref, partial))}.", ""]
        return lines

    def not_included(self) -> list[str]:
        if not self.excluded:
            return []
        lines = ["## Not included", "",
                 "Folders of the studies directory that this paper leaves out, with the reason and the "
                 f"commands that would bring them in. {RUNS_NOTE}", ""]
        for e in self.excluded:
            fix = f" Fix: `{' && '.join(e.fix)}`." if e.fix else ""
            lines.append(f"- `{e.name}`: {e.reason}.{fix}")
        return lines + [""]

    def reproduce(self) -> list[str]:
        lines = ["## How to reproduce", "", "```bash", "bash scripts/setup.sh"]
        for s in self.found:
            lines.append(" && ".join(_commands(self.studies, s.name, self.root)))
        out = _rel(self.out, self.root)
        lines += [f"exoticnorm paper --studies {_rel(self.studies, self.root)} --out {out}", "```", "",
                  f"`{out}/provenance.json` maps every number printed here to its source (study, cell, key, "
                  f"computation); `{out}/sources.json` holds the sha256 of every input. "
                  "`pytest tests/test_paper.py` recomputes them.", ""]
        return lines

    def references(self) -> list[str]:
        return ["## References", "", *[f"- [{r['key']}] {r['text']}" for r in self.lit.get("reference", [])], ""]

    def markdown(self) -> str:
        title = ["# Normalization beyond batch norm: exoticnorm's studies on FashionMNIST", "",
                 "Generated by `exoticnorm paper` from the study reports; no number is typed by hand.", ""]
        parts = [title, self.abstract(), self.intro(), self.methods(), self.protocol_section(), self.results(),
                 self.literature(), self.limitations(), self.not_included(), self.reproduce(), self.references()]
        return "\n".join(line for part in parts for line in part).rstrip() + "\n"


# ---------------------------------------------------------------- markdown → typst


_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "lambda", "mu", "nu", "rho", "sigma", "Sigma",
          "Lambda", "Phi", "phi", "omega", "pi", "tau", "Delta", "theta"}
_SYMBOLS = {"circ": "compose", "odot": "dot.o", "cdot": "dot.op", "top": "top", "leftarrow": "<-",
            "to": "->", "le": "<=", "ge": ">=", "in": "in", "approx": "approx", "sum": "sum",
            "times": "times", "ldots": "...", "log": "log", "quad": "quad", "partial": "partial",
            ",": "thin", "bar": "overline", "hat": "hat", "tilde": "tilde", "sqrt": "sqrt"}
_MATH_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|[A-Za-z]|\d+|\s+|.")


def latex_to_typst(src: str) -> str:
    """The LaTeX math subset of this paper → Typst math (ValueError on anything else)."""
    tokens = [t for t in _MATH_TOKEN.findall(src) if not t.isspace()]
    pos = 0

    def seq(until: str | None) -> str:
        nonlocal pos
        out: list[str] = []
        while pos < len(tokens) and tokens[pos] != until:
            piece = step()
            if (piece[:1] in "^_" or piece == "'") and out:
                out[-1] += piece  # an attachment sticks to its base
            else:
                out.append(piece)
        pos += 1  # past the closing brace
        return " ".join(out)

    def group() -> str:
        nonlocal pos
        pos += 1
        return seq("}") if tokens[pos - 1] == "{" else atom(tokens[pos - 1])

    def raw_group() -> str:
        nonlocal pos
        assert tokens[pos] == "{", src
        end = tokens.index("}", pos)
        text = "".join(tokens[pos + 1:end])
        pos = end + 1
        return text

    def atom(t: str) -> str:
        if t.startswith("\\"):
            name = t[1:]
            if name in _GREEK:
                return name
            if name in ("|",):
                return "||"
            if name in _SYMBOLS and name not in ("bar", "hat", "tilde", "sqrt"):
                return _SYMBOLS[name]
            raise ValueError(f"no Typst form for \\{name} in math {src!r}")
        return t

    def step() -> str:
        nonlocal pos
        t = tokens[pos]
        pos += 1
        if t == "{":
            return seq("}")
        if t in ("^", "_"):
            return t + "(" + group() + ")"
        if t == "\\frac":
            a = group()
            return f"({a})/({group()})"
        if t in ("\\operatorname", "\\mathrm", "\\text"):
            return f'"{raw_group()}"'
        if t in ("\\bar", "\\hat", "\\tilde", "\\sqrt"):
            return f"{_SYMBOLS[t[1:]]}({group()})"
        return atom(t)

    return seq(None)


_PUNCT = set("\\#$*_<>@[]~`/'\"=-+:")


def _escape(text: str) -> str:
    return "".join("\\" + ch if ch in _PUNCT else ch for ch in text)


_INLINE = re.compile(r"`([^`]+)`|\$([^$]+)\$|\*\*(.+?)\*\*|\[([^\]]+)\]\(([^)]+)\)")


def _inline(text: str) -> str:
    out, last = [], 0
    for m in _INLINE.finditer(text):
        out.append(_escape(text[last:m.start()]))
        code, math_, bold, label, url = m.groups()
        if code is not None:
            out.append("`" + code + "`")
        elif math_ is not None:
            out.append("$" + latex_to_typst(math_) + "$")
        elif bold is not None:
            out.append("*" + _inline(bold) + "*")
        else:
            out.append(f'#link("{url}")[{_inline(label)}]')
        last = m.end()
    out.append(_escape(text[last:]))
    return "".join(out)


def _table(rows: list[str]) -> str:
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    head, body = cells[0], cells[2:]
    size = "7pt" if len(head) > 6 else "8pt"
    items = ", ".join(f"[{_inline(c)}]" for c in head)
    body_items = ", ".join(f"[{_inline(c)}]" for row in body for c in row)
    return (f"#block(breakable: true, text(size: {size}, table(columns: {len(head)}, align: left, "
            f"stroke: 0.4pt + gray, table.header({items}), {body_items})))")


def to_typst(markdown: str, image_root: Path, md_dir: Path) -> str:
    """The paper's markdown as Typst markup; images become figures with paths from ``image_root``
    (the compiler's root), resolved against ``md_dir``."""
    out = ['#set page(paper: "a4", margin: 2cm, numbering: "1")',
           '#set text(font: "Libertinus Serif", size: 10pt)',
           "#set par(justify: true)", '#set heading(numbering: "1.1")',
           "#show raw: set text(size: 8pt)", ""]
    lines = markdown.splitlines()
    i, para = 0, []

    def flush() -> None:
        if para:
            out.append(_inline(" ".join(para)))
            out.append("")
            para.clear()

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            flush()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            out += [line, *lines[i + 1:end], "```", ""]
            i = end + 1
            continue
        if line.strip() == "$$":
            flush()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "$$")
            out += ["$ " + latex_to_typst(" ".join(lines[i + 1:end])) + " $", ""]
            i = end + 1
            continue
        if line.startswith("|"):
            flush()
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            out += [_table(lines[i:end]), ""]
            i = end
            continue
        m = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip())
        if m:
            flush()
            path = "/" + _rel((md_dir / m.group(2)), image_root.resolve())
            out += [f'#figure(image("{path}", width: 88%, height: 10cm, fit: "contain"), '
                    f'caption: [{_inline(m.group(1))}])', ""]
        elif line.startswith("#"):
            flush()
            level = len(line) - len(line.lstrip("#"))
            heading = _inline(line[level:].strip())
            if level == 1:
                out += [f"#align(center, text(size: 16pt, weight: \"bold\")[{heading}])", ""]
            else:
                out += ["=" * (level - 1) + " " + heading, ""]
        elif line.startswith("- "):
            flush()
            item = [line[2:]]
            while i + 1 < len(lines) and lines[i + 1].startswith("  ") and lines[i + 1].strip():
                i += 1
                item.append(lines[i].strip())
            out.append("- " + _inline(" ".join(item)))
        elif not line.strip():
            flush()
            out.append("")
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out) + "\n"


def build_pdf(markdown: str, out: Path, root: Path) -> bytes:
    """The PDF of the paper's markdown; figures resolved under ``root``."""
    try:
        import typst
    except ImportError as exc:
        raise click.ClickException("the PDF needs the typst package: pip install 'exoticnorm[paper]' "
                                   "(or pass --no-pdf)") from exc
    source = to_typst(markdown, root, out)
    try:
        return typst.compile(source.encode(), root=str(root), ignore_system_fonts=True, timestamp=0)
    except Exception as exc:  # typst raises its own error types with the compiler's message
        (out / "paper.typ").write_text(source)
        raise click.ClickException(f"typst could not compile the paper ({out / 'paper.typ'} kept): {exc}") from exc


# ---------------------------------------------------------------- the command


def render(studies: Path, out: Path, link_dir: Path | None = None,
           literature: Path = LITERATURE) -> tuple[str, Writer]:
    """The paper's markdown and its Writer (ledger, studies); nothing written."""
    studies, out = Path(studies), Path(out)
    if not studies.is_dir():
        raise click.ClickException(f"no studies folder {studies}")
    if not Path(literature).is_file():
        raise click.ClickException(f"no {literature} (the literature the paper quotes); run from the repository")
    link_dir = Path(link_dir) if link_dir is not None else out
    root = Path(os.path.commonpath([studies.resolve(), link_dir.resolve()]))
    found, excluded = find_studies(studies, root)
    protocol = _check_protocols(found, excluded, studies, root)
    writer = Writer(studies, link_dir, root, found, excluded, protocol, literature)
    return writer.markdown(), writer


def _provenance_json(data: dict) -> str:
    """provenance.json with one line per source of a number (diffs stay readable)."""
    rows = [f"  {json.dumps(text, ensure_ascii=False)}: [\n" + ",\n".join(
        f"    {json.dumps(src, ensure_ascii=False)}" for src in sources) + "\n  ]"
        for text, sources in data["numbers"].items()]
    return ("{\n" + f' "root": {json.dumps(data["root"])},\n "numbers": {{\n' + ",\n".join(rows) + "\n },\n"
            + f' "verbatim": {json.dumps(data["verbatim"], ensure_ascii=False)}\n}}\n')


def write_paper(studies: Path, out: Path, pdf: bool = True, link_dir: Path | None = None,
                literature: Path = LITERATURE, echo=print) -> dict:
    """Write OUT/paper.md, provenance.json, sources.json (and paper.pdf, paper.typ); return sources."""
    out = Path(out)
    markdown, w = render(studies, out, link_dir, literature)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper.md").write_text(markdown)
    (out / "provenance.json").write_text(_provenance_json(w.ledger.as_json(out)))
    root = w.root
    files = sorted({p for p in w.studies.glob("*/results.json")} | {s.toml_path for s in w.found})
    figures = [f for s in w.found for f in s.figures]
    sources = {"root": _rel(root, out.resolve()),
               "inputs": {_rel(p, root): sha256(p) for p in [*files, literature]},
               "figures": {_rel(p, root): sha256(p) for p in figures},
               "paper.md": sha256(out / "paper.md"), "pdf": None}
    old = out / "sources.json"
    if pdf:
        data = build_pdf(markdown, out, root)
        (out / "paper.pdf").write_bytes(data)
        sources["pdf"] = {"paper.md": sources["paper.md"], "figures": sources["figures"],
                          "paper.pdf": sha256(out / "paper.pdf")}
    elif (out / "paper.pdf").exists() and old.exists():
        sources["pdf"] = json.loads(old.read_text()).get("pdf")  # as it was: a stale PDF stays detectable
    (out / "sources.json").write_text(json.dumps(sources, indent=1) + "\n")
    names, left = ", ".join(s.name for s in w.found), ", ".join(e.name for e in w.excluded)
    echo(f"paper: {len(w.found)} {'study' if len(w.found) == 1 else 'studies'} ({names}) under the "
         f"{w.protocol} protocol; {len(w.excluded)} not included" + (f" ({left})" if left else ""))
    echo(f"wrote {out / 'paper.md'}, provenance.json ({sum(map(len, w.ledger.numbers.values()))} numbers), "
         f"sources.json" + (", paper.pdf" if pdf else " (no PDF: --no-pdf)"))
    return sources
