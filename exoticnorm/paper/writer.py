"""The Writer: paper.md, section by section, every number through one Ledger."""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path
from typing import Any

from ..points import ACC_KEYS as PROTOCOL_KEYS, MIN_TRAIN_ACC
from ..stats import welch
from .ledger import Ledger, lookup, series
from .sources import RUNS_NOTE, Diagnosis, Excluded, StudyData, read_toml, rel, study_commands
from .text import INTRO, LITERATURE_TEXT, METHODS


#: d2l's research ideas (exercise 7 of the batch-norm chapter): number, question, the norms of
#: their cells in the study ``RESEARCH`` (7.2: zca with its default transform only)
IDEAS = (("7.1", "Can the probability integral transform serve as a norm?", {"pit"}),
         ("7.2", "Can one use a full-rank covariance estimate?", {"zca"}),
         ("7.3", "Can one use compact matrix variants (block-diagonal, Monarch, circulant)?",
          {"block-zca", "monarch-zca", "circulant-zca"}),
         ("7.4", "Does a sparsification compression act as a regularizer?", {"sparse-zca"}))
RESEARCH = "research"

#: a diagnosis's per-site medians (results.json summary keys) and what they are
DIAGNOSIS_MEDIANS = (("grad_norm_median", "‖∂L/∂W‖ of the layer, median over steps"),
                     ("gain_median", "backward gain ‖∂L/∂x‖ / ‖∂L/∂y‖ of the norm after the layer, median over steps"),
                     ("slope_median_last", "the norm's local slope ∂y/∂x, median at the last probe"),
                     ("batch_noise_median", "batch noise RMS(y_full − y_half) / RMS(y_full) of the norm's output "
                                            "(the first half of a batch normalized with the whole batch vs alone), "
                                            "median over probes"))


def _in_idea(c: dict, norms: set[str]) -> bool:
    cfg = c["config"]
    zca_default = cfg.get("norm") != "zca" or cfg.get("norm_opts", {}).get("transform", "zca") == "zca"
    return cfg.get("norm") in norms and zca_default


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    m = re.match(r"(.*?[.?!])(?=\s|$)", text)
    return m.group(1) if m else text


def _maybe(doc: Any, key: str) -> Any:
    try:
        return lookup(doc, key)
    except (KeyError, IndexError):
        return None


def _cells_str(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names) if names else "none"


class Writer:
    """The paper's markdown, built from the studies through one Ledger."""

    def __init__(self, studies: Path, link_dir: Path, root: Path, found: list[StudyData],
                 excluded: list[Excluded], protocol: str, literature: Path,
                 diagnoses: list[Diagnosis] = (), probes: dict[str, Diagnosis] | None = None) -> None:
        # link_dir: where paper.md will be read from (figure links, the --out of the commands)
        self.studies, self.link_dir, self.root = studies, link_dir, root
        self.found, self.excluded, self.protocol = found, excluded, protocol
        self.diagnoses = list(diagnoses)
        self.probes = dict(probes or {})  # study name → eval probe of its runs
        self.lit_path = literature
        self.lit = read_toml(literature)
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

    def delta(self, s: StudyData, cell: str, with_p: bool = True) -> tuple[str, str, str]:
        vs = s.cell(cell).get("vs_reference") or {}
        d = self.L.num(s, cell, "vs_reference.delta", fmt="+.4f") if vs.get("delta") is not None else "–"
        if vs.get("ci_low") is None:
            return d, "–", "–"
        ci = (f"[{self.L.num(s, cell, 'vs_reference.ci_low', fmt='+.4f')}, "
              f"{self.L.num(s, cell, 'vs_reference.ci_high', fmt='+.4f')}]")
        return d, ci, self.L.num(s, cell, "vs_reference.p", fmt=".2g") if with_p else ""

    def acc_key(self) -> str:
        return PROTOCOL_KEYS[self.protocol]

    def other_protocol(self, s: StudyData) -> str | None:
        """The other protocol's key when its values differ anywhere in the study."""
        other = next(k for p, k in PROTOCOL_KEYS.items() if p != self.protocol)
        return other if any(c.get(other) != c.get("test_acc") for c in s.cells) else None

    def verdict(self, s: StudyData, cells: list[dict] | None = None) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {"higher": [], "lower": [], "no detectable difference": [],
                                        "not tested (one run on a side)": []}
        for c in s.cells if cells is None else cells:
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

    def reference(self, s: StudyData) -> tuple[str, bool]:
        """(how the text names the reference, whether it differs per cell: then each cell says its own)."""
        ref = s.analysis.get("reference", s.cells[0]["cell"])
        refs = {c["vs_reference"].get("reference") for c in s.cells if c.get("vs_reference")}
        if isinstance(ref, dict):  # each cell against its twin with this label (study.py)
            (axis, label), = ref.items()
            return f"its twin with {axis} = {label}", True
        if len(refs) > 1:
            return f"`{ref}` at the same {s.analysis.get('x', 'setting').replace('_', ' ')}", True
        return f"`{refs.pop() if refs else ref}`", False

    def twin_mismatch(self, s: StudyData) -> list[str]:
        """Cells whose results.json reference is not their twin (a report from before the pairing)."""
        ref = s.analysis.get("reference")
        if not isinstance(ref, dict):
            return []
        (axis, label), = ref.items()
        key = {tuple(sorted(c["labels"].items())): c["cell"] for c in s.cells}
        wrong = []
        for c in s.cells:
            twin = key.get(tuple(sorted({**c["labels"], axis: label}.items())))
            got = (c.get("vs_reference") or {}).get("reference")
            if got != (None if twin == c["cell"] else twin):
                wrong.append(c["cell"])
        return wrong

    def grouped(self, s: StudyData, groups: dict[str, list[str]], vs: str | None = None, key: str = "test_acc",
                minus: str | None = None, words: dict[str, str] | None = None, keep: tuple[str, ...] = ()) -> str:
        """``higher than REF: `a` Δ = … [lo, hi]; …``: each group of cells with its Δ and CI, against
        the study's reference (vs None) or against cell ``vs`` (Welch's test of ``key``, ``minus``)."""
        ref_name, per_cell = self.reference(s) if vs is None else (f"`{vs}`", False)
        words = words or {}
        parts = []
        for group, cells in groups.items():
            if not cells and group not in keep:
                continue
            items = []
            for k in cells:
                if vs is None:
                    d, ci, _ = self.delta(s, k, with_p=False)
                    own = f" (vs `{s.cell(k)['vs_reference']['reference']}`)" if per_cell else ""
                else:
                    more = {"vs": vs, **({"minus": minus} if minus else {})}
                    d = self.L.num(s, k, key, "welch.delta", "+.4f", **more)
                    ci = (f"[{self.L.num(s, k, key, 'welch.ci_low', '+.4f', **more)}, "
                          f"{self.L.num(s, k, key, 'welch.ci_high', '+.4f', **more)}]"
                          if self.welch(s, k, vs, key, minus).tested else "–")
                    own = ""
                items.append(f"`{k}`{own} Δ = {d}" + (f" {ci}" if ci != "–" else ""))
            head = {"higher": f"{words.get('higher', 'higher')} than {ref_name}",
                    "lower": f"{words.get('lower', 'lower')} than {ref_name}",
                    "no detectable difference": f"no detectable difference from {ref_name}"}.get(group, group)
            parts.append(f"{head}: {', '.join(items) or 'none'}")
        return "; ".join(parts)

    @staticmethod
    def welch(s: StudyData, cell: str, vs: str, key: str, minus: str | None):
        return welch(series(s.cells, cell, key, minus), series(s.cells, vs, key, minus))

    def pair_groups(self, s: StudyData, cells: list[dict], vs: str, key: str = "test_acc",
                    minus: str | None = None) -> dict[str, list[str]]:
        """The cells grouped by Welch's CI of ``key`` (− ``minus``) against cell ``vs``."""
        groups: dict[str, list[str]] = {"higher": [], "lower": [], "no detectable difference": [],
                                        "not tested (one run on a side)": []}
        for c in cells:
            if not c["n"] or c["cell"] == vs:
                continue
            d = self.welch(s, c["cell"], vs, key, minus)
            name = ("not tested (one run on a side)" if not d.tested else "higher" if d.ci_low > 0
                    else "lower" if d.ci_high < 0 else "no detectable difference")
            groups[name].append(c["cell"])
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
        for d in self.diagnoses:
            lines.append(f"- {self.study_ref(d)}: a per-step diagnosis with one seed ({_cells_str(list(d.summary))}), "
                         "not a comparison of means.")
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
            where = [f"`{n}`" for n, have in norms.items() if have & wanted]
            where += [f"`{d.name}` (diagnosis)" for d in self.diagnoses if self.diagnosis_norms(d) & wanted]
            lines.append(f"- {topic}: {', '.join(where) or 'no included study'}.")
        return lines + [""]

    def idea_number(self, number: str) -> str:
        exercise, idea = number.split(".")
        return self.L.define(number, f"d2l's numbering (batch-norm chapter): exercise {exercise}, research idea {idea}")

    def diagnosis_norms(self, d: Diagnosis) -> set[str]:
        """The norms of the research ideas whose name starts a variant of the diagnosis (pit-normal → pit)."""
        norms = set().union(*(n for _, _, n in IDEAS))
        return {n for n in norms for v in d.summary if v != "bn" and (v == n or v.startswith(n + "-"))}

    def answer(self, s: StudyData) -> str:
        """The best cell and, against the reference, the cells grouped by the CI of Δ."""
        best = self.ranked(s)
        if not best:
            return "no finished run yet."
        text = f"best `{best[0]['cell']}`, {self.mean_std(s, best[0]['cell'], 'test_acc')}"
        groups = self.verdict(s)
        stale = " (stale report: some cells not against their twin, see Results)" if self.twin_mismatch(s) else ""
        return text + (f"; {self.grouped(s, groups)}" if any(groups.values()) else "") + stale + "."

    def idea_answer(self, s: StudyData, norms: set[str]) -> str:
        cells = [c for c in s.cells if _in_idea(c, norms)]
        if not cells:
            return f"no cell of {self.study_ref(s)} has the norm {_cells_str(sorted(norms))}."
        groups = self.verdict(s, cells)
        text = (self.grouped(s, groups) if any(groups.values())
                else f"{_cells_str([c['cell'] for c in cells])}: not compared (no finished runs or no reference)")
        if norms != {"sparse-zca"}:
            return text + "."
        dense = next((c for c in s.cells if _in_idea(c, {"zca"}) and c["n"]), None)
        if dense is None:
            return text + "; no dense `zca` cell to compare the densities with."
        zca = dense["cell"]
        gaps = ", ".join(f"`{c['cell']}` {self.L.num(s, c['cell'], 'train_acc', 'mean', minus='test_acc')}"
                         for c in [dense, *cells] if c["n"])
        return (f"{text}. Against dense `{zca}` (test accuracy): "
                f"{self.grouped(s, self.pair_groups(s, cells, zca), vs=zca, keep=('higher',))}. "
                f"Train − test gap (mean over seeds of train acc − test acc): {gaps}; against `{zca}`'s: "
                + self.grouped(s, self.pair_groups(s, cells, zca, 'train_acc', 'test_acc'), vs=zca, key="train_acc",
                               minus="test_acc", words={"higher": "larger gap", "lower": "smaller gap"},
                               keep=("lower",)) + ".")

    def diagnosis_answer(self, d: Diagnosis) -> str:
        losses = ", ".join(f"`{v}` {self.L.num(d, None, f'summary.{v}.train_loss_last100')}" for v in d.summary)
        return (f"One-seed per-step diagnosis {self.study_ref(d)} (not a comparison of means, no CI): train loss over "
                f"the final steps (`train_loss_last100`) {losses}; see its section in Results.")

    def answers(self) -> list[str]:
        lines = ["## Answers to d2l's questions", "",
                 f"One line per question: the first sentence of the study's question, the cell with the best mean test "
                 f"accuracy ({self.protocol}) and, against the study's reference, Δ of mean test accuracy with "
                 f"Welch's {self.ci_level()} CI, the cells grouped by the interval: higher (above zero), lower "
                 "(below zero), no detectable difference (containing zero). Details in Results.", ""]
        research = next((s for s in self.found if s.name == RESEARCH), None)
        missing = next((e for e in self.excluded if e.name == RESEARCH), None)
        for number, question, norms in IDEAS:
            idea = self.idea_number(number)
            if research is not None:
                text = f"({self.study_ref(research)}) {self.idea_answer(research, norms)}"
            else:
                why = missing.reason if missing else "no study file"
                fix = f"; run `{' && '.join(missing.fix)}`" if missing and missing.fix else ""
                text = f"Unanswered, {self.study_ref(missing) if missing else f'`{RESEARCH}`'}: {why}{fix}."
            lines.append(f"- **{idea}** {question} {text}")
            for d in self.diagnoses:
                if self.diagnosis_norms(d) & norms:
                    lines.append(f"  {self.diagnosis_answer(d)}")
        for s in self.found:
            question = first_sentence(s.spec.get("question", ""))
            rest = ""
            if s is research:
                others = [c for c in s.cells if not any(_in_idea(c, n) for _, _, n in IDEAS)]
                groups = self.verdict(s, others)
                best = self.ranked(s)
                rest = (f"best `{best[0]['cell']}`, {self.mean_std(s, best[0]['cell'], 'test_acc')}" if best else
                        "no finished run yet") + (f"; the cells of no idea: {self.grouped(s, groups)}"
                                                  if any(groups.values()) else "")
            lines.append(f"- {self.study_ref(s)}: {self.L.quote(question, s.toml_path, 'question')} "
                         f"{rest + '.' if s is research else self.answer(s)}")
        for e in self.excluded:
            toml = self.studies / f"{e.name}.toml"
            if e.fix and toml.is_file() and e is not missing:  # research: in the lines of the ideas
                question = first_sentence(read_toml(toml).get("question", ""))
                lines.append(f"- `{e.name}`: {self.L.quote(question, toml, 'question')} Unanswered, {e.reason}: "
                             f"run `{' && '.join(e.fix)}`.")
        return lines + [""]

    def methods(self) -> list[str]:
        return ["## Methods", "", METHODS, ""]

    def protocol_section(self) -> list[str]:
        from ..points import PROTOCOLS

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
        for d in self.diagnoses:
            lines += self.diagnosis_section(d)
        return lines

    def diagnosis_section(self, d: Diagnosis) -> list[str]:
        """A per-step diagnosis: its summary per variant and its medians as ratios to bn's."""
        L, own = self.L, PROTOCOL_KEYS[self.protocol]
        other = next(k for k in PROTOCOL_KEYS.values() if k != own)
        ideas = [f"{self.idea_number(n)} ({q})" for n, q, norms in IDEAS if norms & self.diagnosis_norms(d)]
        script = d.dir / "run.py"
        lines = [f"### Diagnosis {self.study_ref(d)}: {d.title}", "",
                 (f"For research idea {', '.join(ideas)}. " if ideas else "")
                 + f"Every variant trains d2l's LeNet for {L.num(d, None, 'epochs', fmt='d')} epochs at lr "
                 f"{L.num(d, None, 'lr', fmt='g')}"
                 + (f" (`{rel(script, self.root)}`)" if script.is_file() else "")
                 + ", with one seed: per-step traces, a diagnosis of how training differs, not a comparison of "
                 "means, so no confidence interval and no test. Train loss and accuracy: means over the final "
                 "steps (`train_loss_last100`, `train_acc_last100`); test accuracy under this paper's protocol and "
                 "the other.", "",
                 f"| variant | train loss | train acc | test acc ({self.protocol}) | "
                 f"test acc ({other.removeprefix('test_acc_')}) |", "|---|---|---|---|---|"]
        for v in d.summary:
            lines.append(f"| `{v}` | " + " | ".join(L.num(d, None, f"summary.{v}.{k}") for k in
                         ("train_loss_last100", "train_acc_last100", own, other)) + " |")
        medians = [(k, what) for k, what in DIAGNOSIS_MEDIANS if isinstance(d.summary["bn"].get(k), dict)]
        sites = list(dict.fromkeys(site for k, _ in medians for site in d.summary["bn"][k]))
        lines += ["", "Medians per site, each variant's as a ratio to `bn`'s (the `bn` row: its own median): "
                  + "; ".join(f"**{k}**, {what}" for k, what in medians) + ".", "",
                  "| median | variant | " + " | ".join(sites) + " |", "|---" * (len(sites) + 2) + "|"]
        for k, _ in medians:
            for v in d.summary:
                have = d.summary[v].get(k, {})
                row = ["–" if site not in have or site not in d.summary["bn"][k] else
                       L.num(d, None, f"summary.bn.{k}.{site}", fmt=".3g") if v == "bn" else
                       L.num(d, None, f"summary.{v}.{k}.{site}", "ratio", ".3g", over=f"summary.bn.{k}.{site}")
                       for site in sites]
                lines.append(f"| {k} | `{v}` | " + " | ".join(row) + " |")
        return lines + [""] + self.figures(d)

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
        if s.name in self.probes:
            lines += self.probe(self.probes[s.name])
        lines += self.figures(s)
        return lines

    def probe(self, d: Diagnosis) -> list[str]:
        """A study's PIT eval probe (studies/pit-diagnosis/resnet_eval.py): three accuracies."""
        def acc(key: str) -> str:
            return (f"{self.L.num(d, None, f'summary.{key}.mean')} ± "
                    f"{self.L.num(d, None, f'summary.{key}.std')}")
        script = d.dir / "resnet_eval.py"
        return [f"**Where PIT's eval accuracy goes** (`{rel(d.results_path.with_suffix('.md'), self.root)}`"
                + (f", by `{rel(script, self.root)}`" if script.is_file() else "")
                + f"; this study's PIT runs, the first {d.cells['images']} test images, mean ± std over runs): "
                f"with every PIT layer in eval, its sketch rebuilt by the precise protocol, accuracy "
                f"{acc('all_eval')}; with every layer on the test batch's own CDF (its training transform), "
                f"{acc('all_batch')} (compare the train accuracy above); rebuilt one layer at a time with the "
                "layers before it in eval (`precise_statistics(..., sequential=True)`), the sketches give "
                f"{acc('all_eval_sequential')}. The probe's per-layer table (one layer in eval, all but one, "
                "the ties in each layer's input) reads the gap as layer-wise differences between the eval "
                "and training transforms at tied values that compound over depth when each sketch is built "
                "on inputs shaped by the training transforms before it. A measurement on these runs, not "
                "this paper's protocol, which stays one-pass for every norm.", ""]

    def compare_table(self, s: StudyData) -> list[str]:
        other = self.other_protocol(s)
        ref = s.analysis.get("reference", s.cells[0]["cell"])
        ref_name, per_cell = self.reference(s)
        if isinstance(ref, dict):  # each cell against its twin with this label (study.py)
            (axis, label), = ref.items()
            is_ref = lambda c: c["labels"].get(axis) == label  # noqa: E731
        else:
            is_ref = lambda c: c["cell"] == ref  # noqa: E731
        head = ["cell", "n", "diverged", f"test acc ({s.protocol})"]
        if other:
            head.append(f"test acc ({other.removeprefix('test_acc_')})")
        head += ["train acc", *(["compared with"] if per_cell else []), f"Δ vs {ref_name}", f"{self.ci_level()} CI", "p"]
        lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for c in s.cells:
            k = c["cell"]
            row = [f"`{k}`", f"{self.L.num(s, k, 'n', fmt='d')}/{self.L.num(s, k, '', 'runs', 'd')}",
                   self.L.num(s, k, "diverged", fmt="d"), self.mean_std(s, k, "test_acc")]
            if other:
                row.append(self.mean_std(s, k, other))
            row.append(self.mean_std(s, k, "train_acc"))
            vs = c.get("vs_reference")
            if per_cell:
                row.append(f"`{vs['reference']}`" if vs else "")
            row += list(self.delta(s, k)) if vs else ["reference" if is_ref(c) else "–", "", ""]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        groups = self.verdict(s)
        if any(groups.values()):
            lines += [f"Against {ref_name} (Δ, {self.ci_level()} CI): {self.grouped(s, groups)}.", ""]
        wrong = self.twin_mismatch(s)
        if wrong:
            lines += [f"**Stale report:** {_cells_str(wrong)} are compared in results.json with another cell than "
                      f"{ref_name} (a report from before the twin pairing); re-report: "
                      f"`exoticnorm report {rel(s.toml_path, self.root)}`.", ""]
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
            floor = MIN_TRAIN_ACC
            floor_text = self.L.define(f"{floor:g}", "default of analysis.min_train_acc (exoticnorm/points.py)")
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
            lines.append(" && ".join(study_commands(self.studies, s.name, self.root)))
        for d in self.diagnoses:
            if (d.dir / "run.py").is_file():  # fenced: its numbers are not scanned
                lines.append(f"python {rel(d.dir / 'run.py', self.root)} --epochs {d.cells['epochs']} "
                             f"--lr {d.cells['lr']:g}")
        out = rel(self.link_dir, self.root)
        lines += [f"exoticnorm paper --studies {rel(self.studies, self.root)} --out {out}", "```", "",
                  f"`{out}/provenance.json` maps every number printed here to its source (study, cell, key, "
                  f"computation); `{out}/sources.json` holds the sha256 of every input. "
                  "`pytest tests/test_paper.py` recomputes them.", ""]
        return lines

    def references(self) -> list[str]:
        return ["## References", "", *[f"- [{r['key']}] {r['text']}" for r in self.lit.get("reference", [])], ""]

    def markdown(self) -> str:
        title = ["# Normalization beyond batch norm: exoticnorm's studies on FashionMNIST", "",
                 "Generated by `exoticnorm paper` from the study reports; no number is typed by hand.", ""]
        parts = [title, self.abstract(), self.intro(), self.answers(), self.methods(), self.protocol_section(),
                 self.results(), self.literature(), self.limitations(), self.not_included(), self.reproduce(), self.references()]
        return "\n".join(line for part in parts for line in part).rstrip() + "\n"
