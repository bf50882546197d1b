"""The studies the paper draws on: their reports found and checked, the rest listed with the reason."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import click
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: said wherever old-format studies are listed: `exoticnorm run` skips finished runs, and
#: `exoticnorm report` refuses runs recorded before the protocol pair (report.collect)
RUNS_NOTE = ("Runs recorded before the protocol pair (in runs/studies/NAME) are refused by `exoticnorm report`, "
             "which says how to move them aside before re-running.")


def rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, with forward slashes."""
    return Path(os.path.relpath(Path(path).resolve(), root)).as_posix()


def read_toml(path: Path) -> dict:
    return tomllib.loads(Path(path).read_text())


@dataclass
class StudyData:
    name: str
    dir: Path
    results_path: Path
    toml_path: Path
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
class Diagnosis:
    """A per-step diagnosis (a folder's run.py wrote results.json = {epochs, lr, summary:
    {variant: {...}}}): one seed, no study file; numbers come from its results.json."""

    name: str
    dir: Path
    results_path: Path
    cells: dict  # the whole results.json (``Ledger.num`` with cell None reads its keys)
    figures: list[Path]
    readme: str
    toml_path: None = None

    @property
    def summary(self) -> dict[str, dict]:
        return self.cells["summary"]

    @property
    def title(self) -> str:
        return next((line[2:].strip() for line in self.readme.splitlines() if line.startswith("# ")), self.name)


#: the keys every variant of a diagnosis summary has (studies/pit-diagnosis/run.py)
DIAGNOSIS_KEYS = {"train_loss_last100", "train_acc_last100", "test_acc_running", "test_acc_precise"}


def _diagnosis(name: str, folder: Path, results: Path, doc) -> Diagnosis | None:
    summary = doc.get("summary") if isinstance(doc, dict) else None
    if not (isinstance(summary, dict) and "bn" in summary and "epochs" in doc and "lr" in doc
            and all(isinstance(v, dict) and DIAGNOSIS_KEYS <= v.keys() for v in summary.values())):
        return None
    readme = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
    return Diagnosis(name, folder, results, doc, _figures(folder, readme), readme)


#: the accuracies an eval probe (studies/pit-diagnosis/resnet_eval.py) summarises
PROBE_KEYS = ("all_eval", "all_batch", "all_eval_sequential")


def _is_probe(doc: Any) -> bool:
    def stat(v: Any) -> bool:
        return isinstance(v, dict) and all(isinstance(v.get(k), (int, float)) for k in ("mean", "std"))
    return (isinstance(doc, dict) and isinstance(doc.get("study"), str) and isinstance(doc.get("images"), int)
            and isinstance(doc.get("summary"), dict) and all(stat(doc["summary"].get(k)) for k in PROBE_KEYS))


def find_eval_probes(studies: Path) -> dict[str, Diagnosis]:
    """Eval probes of a study's finished runs (``studies/*/*-eval.json`` = {study, images,
    summary: {key: {mean, std}}, runs}), by the study they probe; numbers come from the json."""
    probes: dict[str, Diagnosis] = {}
    for path in sorted(studies.glob("*/*-eval.json")):
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            doc = exc
        if not _is_probe(doc):
            raise click.ClickException(f"{path}: not an eval probe ({{study, images, summary, runs}} with "
                                       f"mean and std of {', '.join(PROBE_KEYS)}); rewrite it with its script")
        if doc["study"] in probes:
            raise click.ClickException(f"{path} and {probes[doc['study']].results_path} both probe study "
                                       f"{doc['study']!r}; keep one")
        md = path.with_suffix(".md")
        probes[doc["study"]] = Diagnosis(f"{path.parent.name}/{path.stem}", path.parent, path, doc, [],
                                         md.read_text() if md.is_file() else "")
    return probes


@dataclass
class Excluded:
    name: str
    reason: str
    fix: list[str]


def _figures(folder: Path, readme: str) -> list[Path]:
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", readme)
    names = linked or sorted(p.name for p in folder.glob("*.png"))
    return [folder / n for n in dict.fromkeys(names) if (folder / n).is_file()]


def study_commands(studies: Path, name: str, root: Path) -> list[str]:
    toml = rel(studies / f"{name}.toml", root)
    return [f"exoticnorm run {toml} --jobs 2", f"exoticnorm report {toml}"]


def find_studies(studies: Path, root: Path) -> tuple[list[StudyData], list[Excluded], list[Diagnosis]]:
    """The reports in ``studies`` that carry a protocol, the rest with the reason, and the
    per-step diagnoses (a summary of variants with a bn among them)."""
    names = sorted({p.parent.name for p in studies.glob("*/results.json")}
                   | {p.stem for p in studies.glob("*.toml")}
                   | {p.name for p in studies.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))})
    found, excluded, diagnoses = [], [], []
    for name in names:
        folder, toml = studies / name, studies / f"{name}.toml"
        results = folder / "results.json"
        fix = study_commands(studies, name, root) if toml.is_file() else []
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
        diagnosis = _diagnosis(name, folder, results, cells)
        if diagnosis is not None:
            diagnoses.append(diagnosis)
            continue
        if not (isinstance(cells, list) and cells and all(isinstance(c, dict) and "cell" in c for c in cells)):
            excluded.append(Excluded(name, "results.json is neither a list of study cells (a report of "
                                           "`exoticnorm report`) nor a diagnosis summary with a bn variant", fix))
            continue
        protocols = {c.get("protocol") for c in cells}
        if None in protocols:
            excluded.append(Excluded(name, "reported before the eval-protocol pair (results.json has no "
                                           "`protocol`): the old per-norm protocol, not comparable", fix))
            continue
        if len(protocols) != 1:
            raise click.ClickException(f"{rel(results, root)} mixes protocols {sorted(protocols)} within one "
                                       f"study; re-report it: exoticnorm report {rel(toml, root)}")
        if not toml.is_file():
            excluded.append(Excluded(name, f"no study file {rel(toml, root)} (its question and analysis)", []))
            continue
        spec = read_toml(toml)
        protocol = protocols.pop()
        wanted = spec.get("analysis", {}).get("protocol")
        if wanted is not None and wanted != protocol:
            excluded.append(Excluded(name, f"the report uses the {protocol} protocol but {rel(toml, root)} now "
                                           f"asks for {wanted}: the report is stale",
                                     [f"exoticnorm report {rel(toml, root)}"]))
            continue
        readme = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
        found.append(StudyData(name, folder, results, toml, cells, spec, protocol, _figures(folder, readme), readme))
    return found, excluded, diagnoses


def check_protocols(found: list[StudyData], excluded: list[Excluded], studies: Path, root: Path) -> str:
    """The one protocol of the included studies; a ClickException when there is none or more than one."""
    if not found and not excluded:
        raise click.ClickException(f"no study in {studies}: no NAME.toml and no NAME/results.json there "
                                   "(--studies names the folder of study files and their reports)")
    if not found:
        lines = [f"no study in {rel(studies, root)}/ has a report with an eval protocol (results.json "
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

