"""``exoticnorm paper``: render the paper and write paper.md, provenance.json, sources.json and paper.pdf."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import click

from .pdf import build_pdf
from .sources import check_protocols, find_eval_probes, find_studies, rel
from .writer import Writer

#: what the paper quotes from published work (the repository's paper/ folder)
LITERATURE = Path(__file__).resolve().parents[2] / "paper" / "literature.toml"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
    found, excluded, diagnoses = find_studies(studies, root)
    protocol = check_protocols(found, excluded, studies, root)
    writer = Writer(studies, link_dir, root, found, excluded, protocol, literature, diagnoses,
                    find_eval_probes(studies))
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
    # every results.json, eval probe and study file (the answers quote the questions of studies
    # not included)
    files = sorted({*w.studies.glob("*/results.json"), *(d.results_path for d in w.probes.values()),
                    *w.studies.glob("*.toml")})
    figures = [f for s in [*w.found, *w.diagnoses] for f in s.figures]
    sources = {"root": rel(root, out.resolve()),
               "inputs": {rel(p, root): sha256(p) for p in [*files, literature]},
               "figures": {rel(p, root): sha256(p) for p in figures},
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
    diag = ", ".join(d.name for d in w.diagnoses)
    echo(f"paper: {len(w.found)} {'study' if len(w.found) == 1 else 'studies'} ({names}) under the "
         f"{w.protocol} protocol" + (f", diagnoses ({diag})" if diag else "")
         + f"; {len(w.excluded)} not included" + (f" ({left})" if left else ""))
    echo(f"wrote {out / 'paper.md'}, provenance.json ({sum(map(len, w.ledger.numbers.values()))} numbers), "
         f"sources.json" + (", paper.pdf" if pdf else " (no PDF: --no-pdf)"))
    return sources
