"""`exoticnorm paper`: the committed paper is current, every number in it traces to a source
and recomputes, the hashes of its inputs match, and the study selection rules hold.

The checks (``untraced``, ``stale_sources``) are written here independently of
exoticnorm/paper/: they parse paper.md, provenance.json and sources.json and recompute each
number from its source file themselves. They run on the committed paper/ (skipped while there
is none) and on a synthetic studies folder, where tampering shows that they fail.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import inspect
import json
import re
import shutil
import statistics
import struct
import sys
import zlib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from exoticnorm.cli import main
from exoticnorm.paper import latex_to_typst, write_paper
from exoticnorm.stats import welch

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "paper"
NOTES = REPO.parent / "shared" / "research-notes.md"
RERUN = "run `exoticnorm paper` (and commit paper/)"

# percentages, and numbers with a decimal point (signed, with an exponent)
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?%|(?<![\w.])[-+−]?\d+\.\d+(?:e[-+]?\d+)?")

try:
    import typst  # noqa: F401

    HAS_TYPST = True
except ImportError:
    HAS_TYPST = False


# ---------------------------------------------------------------- the independent checks


def scan(markdown: str) -> tuple[list[str], list[str]]:
    """(numbers in prose and tables, inline code spans); fenced code and link targets left out."""
    text = re.sub(r"^```.*?^```", " ", markdown, flags=re.S | re.M)
    spans = re.findall(r"`([^`]+)`", text)
    text = re.sub(r"`[^`]+`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "] ", text)
    return NUMBER.findall(text), spans


def _lookup(doc, key: str):
    for part in key.split("."):
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _load(path: Path):
    return tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())


def recompute(src: dict, root: Path, printed: str) -> str | None:
    """None when ``src`` gives ``printed``, else what is wrong."""
    kind = src["kind"]
    if kind == "definition":
        if "code" not in src:
            return None if src.get("meaning") else "a definition without a meaning"
        module, _, attr = src["code"].partition(":")
        func, _, param = attr.rpartition(".")
        obj = importlib.import_module(module)
        for part in func.split("."):
            obj = getattr(obj, part)
        value = inspect.signature(obj).parameters[param].default * src["scale"]
        got = format(value, src["format"]) + src["suffix"]
        return None if got == printed else f"{src['code']} gives {got}"
    path = root / src["file"]
    if not path.is_file():
        return f"source {src['file']} is gone"
    doc = _load(path)
    if kind == "quote":
        text = " ".join(str(_lookup(doc, src["key"])).split())
        return None if printed in NUMBER.findall(text) else f"not in {src['file']} {src['key']}"
    if kind == "literature":
        claim = next((c for c in doc["claim"] if c["id"] == src["claim"]), None)
        if claim is None or printed not in claim["numbers"] or printed not in claim["quote"]:
            return f"not a number of claim {src['claim']} in {src['file']}"
        return None
    assert kind == "data", kind
    cell, key, op = src["cell"], src["key"], src["op"]
    if cell is None:
        value = _lookup(doc, key)
    elif cell == "*":
        value = [_lookup(c, key) for c in doc]
    else:
        entry = next((c for c in doc if c["cell"] == cell), None)
        if entry is None:
            return f"no cell {cell} in {src['file']}"
        value = (entry["n"] + entry["diverged"] + entry["missing"]) if op == "runs" else _lookup(entry, key)
    ops = {"value": lambda v: v, "runs": lambda v: v, "mean": statistics.mean, "std": statistics.stdev,
           "len": len, "sum": sum, "min": min, "max": max}
    got = format(ops[op](value), src["format"])
    return None if got == printed else f"{src['file']} {cell} {key} {op} gives {got}"


def untraced(paper_dir: Path) -> list[str]:
    """Problems with paper.md's numbers: not in provenance.json, not recomputing from their
    source, or appearing more or less often than recorded."""
    md = (paper_dir / "paper.md").read_text()
    prov = json.loads((paper_dir / "provenance.json").read_text())
    root = (paper_dir / prov["root"]).resolve()
    tokens, spans = scan(md)
    problems = [f"{t!r} is in paper.md but not in provenance.json (typed by hand?)"
                for t in sorted(set(tokens) - set(prov["numbers"]))]
    seen = collections.Counter(tokens)
    recorded = {t: len(s) for t, s in prov["numbers"].items() if NUMBER.fullmatch(t)}  # integers are not scanned
    problems += [f"{t!r} appears {seen[t]} times in paper.md, provenance.json records {n}"
                 for t, n in sorted(recorded.items()) if seen[t] != n]
    for printed, sources in prov["numbers"].items():
        for src in sources:
            wrong = recompute(src, root, printed)
            if wrong:
                problems.append(f"{printed!r} does not recompute: {wrong}")
    cells = set()
    for src in (s for sources in prov["numbers"].values() for s in sources):
        if src["kind"] == "data" and src["file"].endswith("results.json") and (root / src["file"]).is_file():
            for c in json.loads((root / src["file"]).read_text()):
                cells |= {c["cell"], *c["labels"].values()}
    verbatim = {v["text"]: v["file"] for v in prov.get("verbatim", [])}
    for span in spans:
        if not NUMBER.search(span) or span in cells:
            continue
        if span in verbatim and span in (root / verbatim[span]).read_text():
            continue
        problems.append(f"code span `{span}` holds a number that is neither a cell nor a recorded copy")
    return problems


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stale_sources(paper_dir: Path, need_pdf: bool = True) -> list[str]:
    """Problems with sources.json: inputs or figures changed since the paper was written, or a
    PDF built from another paper.md."""
    sources = json.loads((paper_dir / "sources.json").read_text())
    root = (paper_dir / sources["root"]).resolve()
    problems = []
    for group in ("inputs", "figures"):
        for rel, sha in sources[group].items():
            path = root / rel
            if not path.is_file():
                problems.append(f"{rel} was read for the paper but is gone: {RERUN}")
            elif _sha(path) != sha:
                problems.append(f"{rel} changed since the paper was written: {RERUN}")
    md = paper_dir / "paper.md"
    if _sha(md) != sources["paper.md"]:
        problems.append(f"paper.md is not the one sources.json records: {RERUN}")
    pdf, entry = paper_dir / "paper.pdf", sources["pdf"]
    if entry is None:
        if need_pdf or pdf.exists():
            problems.append(f"paper.pdf was not built with this paper.md (--no-pdf): {RERUN} without --no-pdf")
        return problems
    if not pdf.is_file():
        problems.append(f"paper.pdf is missing: {RERUN}")
    elif _sha(pdf) != entry["paper.pdf"]:
        problems.append(f"paper.pdf is not the PDF sources.json records: {RERUN}")
    if entry["paper.md"] != _sha(md):
        problems.append(f"paper.pdf was built from an older paper.md: {RERUN}")
    for rel, sha in entry["figures"].items():
        if not (root / rel).is_file() or _sha(root / rel) != sha:
            problems.append(f"paper.pdf embeds an older {rel}: {RERUN}")
    return problems


# ---------------------------------------------------------------- the committed paper


def _committed() -> None:
    if not (PAPER / "paper.md").is_file():
        pytest.skip("no committed paper/paper.md yet (the studies have no reports with an eval protocol); "
                    "run `exoticnorm paper` once they do")


def test_committed_paper_is_current(tmp_path):
    _committed()
    try:
        write_paper(REPO / "studies", tmp_path, pdf=False, link_dir=PAPER, echo=lambda *_: None)
    except click.ClickException as exc:
        pytest.fail(f"`exoticnorm paper` fails on the committed studies: {exc.message}")
    fresh, committed = (tmp_path / "paper.md").read_text(), (PAPER / "paper.md").read_text()
    assert fresh == committed, f"paper/paper.md is stale (the studies' reports changed): {RERUN}"


def test_committed_numbers_trace():
    _committed()
    problems = untraced(PAPER)
    assert not problems, "\n".join(problems)


def test_committed_sources_match():
    _committed()
    problems = stale_sources(PAPER)
    assert not problems, "\n".join(problems)


def test_literature_quotes_are_in_the_research_notes():
    if not NOTES.is_file():
        pytest.skip(f"no research notes at {NOTES}")
    notes = " ".join(NOTES.read_text().split())
    for claim in tomllib.loads((PAPER / "literature.toml").read_text())["claim"]:
        quote = " ".join(claim["quote"].split())
        assert quote in notes, f"{claim['id']}: its quote is not in {NOTES}"
        assert all(n in quote for n in claim["numbers"]), claim["id"]


# ---------------------------------------------------------------- a synthetic studies folder


def _png(path: Path, shade: int = 128) -> None:
    """A 2×2 grey PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes([shade, shade]) for _ in range(2))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _config(**kw) -> dict:
    base = {"norm": "bn", "norm_opts": {}, "model": "lenet", "norm_layers": "all", "dropout": 0.0, "bias": True,
            "activation": "sigmoid", "epochs": 2, "lr": 0.1, "batch_size": 128, "optimizer": "sgd",
            "weight_decay": 0.0, "seed": 0, "limit_train": 2000, "limit_test": None, "precise_stats": 100}
    return base | kw


def _cell(name: str, labels: dict, config: dict, precise: list[float], running: list[float],
          protocol: str | None = "precise", ref: tuple[str, list[float]] | None = None) -> dict:
    test = precise if protocol != "running" else running
    c = {"cell": name, "labels": labels, "config": config, "n": len(test), "diverged": 0,
         "missing": 3 - len(test), "test_acc": test, "train_acc": [a + 0.01 for a in test], "epoch_time": 1.25}
    if protocol is None:  # the old format
        return c
    c |= {"seeds": list(range(len(test))), "protocol": protocol, "test_acc_running": running,
          "test_acc_precise": precise}
    if ref:
        c["vs_reference"] = {"reference": ref[0], **welch(test, ref[1]).as_dict()}
    return c


def _study(studies: Path, name: str, toml: str, cells: list[dict], readme: bool = True) -> None:
    (studies / f"{name}.toml").write_text(toml)
    folder = studies / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(cells, indent=2) + "\n")
    _png(folder / "accuracy_per_epoch.png", shade=sum(map(ord, name)) % 256)
    if readme:
        (folder / "README.md").write_text(f"# Study `{name}`\n\n3 runs over seeds [0, 1, 2]; cpu, torch 9.9.9. "
                                          "Mean ± sample std over seeds.\n\n![a](accuracy_per_epoch.png)\n")


def _compare(studies: Path, name: str, protocol: str | None = "precise") -> None:
    bn = [0.871, 0.8802, 0.8753]
    cells = [_cell("bn", {"norm": "bn"}, _config(), bn, [0.87, 0.88, 0.875], protocol),
             _cell("zca", {"norm": "zca"}, _config(norm="zca"), [0.8612, 0.8655, 0.8633],
                   [0.5, 0.61, 0.4], protocol, ("bn", bn)),
             _cell("sparse-zca-0.5", {"norm": "sparse-zca-0.5"}, _config(norm="sparse-zca", norm_opts={"density": 0.5}),
                   [0.8801, 0.8733], [0.86, 0.85], protocol, ("bn", bn))]
    if protocol == "running":
        cells[1]["vs_reference"] = {"reference": "bn", **welch(cells[1]["test_acc"], cells[0]["test_acc"]).as_dict()}
    toml = (f'question = "Does ZCA at lr 0.1 beat BN?"\nseeds = 3\n[analysis]\nkind = "compare"\nreference = "bn"\n'
            f'protocol = "{protocol or "precise"}"\n[grid]\nnorm = ["bn", "zca"]\n')
    _study(studies, name, toml, cells)


def _lr(studies: Path, name: str) -> None:
    cells = []
    for norm in ("bn", "pit"):
        for lr, acc in ((0.1, [0.85, 0.86, 0.855]), (30.0, [0.1, 0.1, 0.1])):
            cfg = _config(norm=norm, lr=lr)
            c = _cell(f"{norm}_lr-{lr:g}", {"norm": norm, "lr": f"lr-{lr:g}"}, cfg, acc, acc)
            c["train_acc"] = [a + 0.02 for a in acc]
            cells.append(c)
    _study(studies, name, 'question = "How large can the lr get (train acc >= 0.5)?"\nseeds = 3\n[analysis]\n'
                          'kind = "lr"\nx = "lr"\nfacet = "norm"\nprotocol = "precise"\nmin_train_acc = 0.5\n'
                          '[grid]\nnorm = ["bn"]\nlr = [0.1, 30.0]\n', cells)


def _fixture(tmp_path: Path, old: bool = True) -> Path:
    studies = tmp_path / "studies"
    studies.mkdir()
    _compare(studies, "alpha")
    _lr(studies, "beta")
    if old:
        _compare(studies, "legacy", protocol=None)
    return studies


def _write(studies: Path, out: Path, pdf: bool = False) -> str:
    write_paper(studies, out, pdf=pdf, echo=lambda *_: None)
    return (out / "paper.md").read_text()


def test_fixture_paper_traces_and_lists_the_old_study(tmp_path):
    studies = _fixture(tmp_path)
    out = tmp_path / "paper"
    md = _write(studies, out, pdf=HAS_TYPST)
    assert untraced(out) == []
    assert stale_sources(out, need_pdf=HAS_TYPST) == []
    assert "## Not included" in md
    legacy = next(line for line in md.splitlines() if line.startswith("- `legacy`"))
    assert "before the eval-protocol pair" in legacy
    assert "exoticnorm run studies/legacy.toml --jobs 2 && exoticnorm report studies/legacy.toml" in legacy
    assert "### Study `alpha`" in md and "### Study `beta`" in md and "### Study `legacy`" not in md
    assert "0.8755 ± 0.0046" in md  # bn's mean ± std of alpha, from results.json
    assert "![alpha: accuracy per epoch](../studies/alpha/accuracy_per_epoch.png)" in md
    prov = json.loads((out / "provenance.json").read_text())
    assert {"kind": "data", "file": "studies/alpha/results.json", "study": "alpha", "cell": "bn", "key": "test_acc",
            "op": "mean", "format": ".4f", "how": "mean over seeds of test_acc"} in prov["numbers"]["0.8755"]
    if HAS_TYPST:
        pdf = (out / "paper.pdf").read_bytes()
        assert pdf.startswith(b"%PDF") and pdf.count(b"/Subtype/Image") >= 2  # the two studies' PNGs


def test_checks_fail_on_a_changed_or_untraced_number(tmp_path):
    studies = _fixture(tmp_path)
    out = tmp_path / "paper"
    md = _write(studies, out)
    (out / "paper.md").write_text(md.replace("0.8755 ± 0.0046", "0.8756 ± 0.0046"))
    assert any("'0.8756' is in paper.md but not in provenance.json" in p for p in untraced(out))
    (out / "paper.md").write_text(md.replace("## Limitations\n", "## Limitations\n\nBN reaches 0.9123 here.\n"))
    assert any("0.9123" in p for p in untraced(out))
    (out / "paper.md").write_text(md.replace("## Limitations\n", "## Limitations\n\nBN tops out at 0.8755.\n"))
    assert any("'0.8755' appears" in p for p in untraced(out))  # a copy of a traced number, typed again
    (out / "paper.md").write_text(md.replace("## Limitations\n", "## Limitations\n\nWe used `lr-0.25`.\n"))
    assert any("`lr-0.25`" in p for p in untraced(out))


def test_checks_fail_when_results_change(tmp_path):
    studies = _fixture(tmp_path)
    out = tmp_path / "paper"
    _write(studies, out)
    results = studies / "alpha" / "results.json"
    cells = json.loads(results.read_text())
    cells[0]["test_acc"][0] = 0.9
    results.write_text(json.dumps(cells))
    assert any("studies/alpha/results.json changed" in p and "exoticnorm paper" in p for p in stale_sources(out, False))
    assert any("does not recompute" in p for p in untraced(out))
    fresh = tmp_path / "fresh"
    write_paper(studies, fresh, pdf=False, link_dir=out, echo=lambda *_: None)
    assert (fresh / "paper.md").read_text() != (out / "paper.md").read_text()  # what the staleness test sees


@pytest.mark.skipif(not HAS_TYPST, reason="the typst package is not installed (pip install 'exoticnorm[paper]')")
def test_checks_fail_on_a_pdf_of_an_older_paper(tmp_path):
    studies = _fixture(tmp_path)
    out = tmp_path / "paper"
    md = _write(studies, out, pdf=True)
    assert stale_sources(out) == []
    (studies / "beta.toml").write_text((studies / "beta.toml").read_text().replace("0.5)?", "0.6)?"))
    _write(studies, out, pdf=False)  # a new paper.md, the old PDF kept
    assert (out / "paper.md").read_text() != md
    assert any("paper.pdf was built from an older paper.md" in p for p in stale_sources(out))
    _write(studies, out, pdf=True)
    assert stale_sources(out) == []
    (studies / "alpha" / "accuracy_per_epoch.png").write_bytes(b"\x89PNG changed")
    assert any("embeds an older studies/alpha/accuracy_per_epoch.png" in p for p in stale_sources(out))


def test_mixed_protocols_are_an_error_naming_each_study(tmp_path):
    studies = _fixture(tmp_path, old=False)
    _compare(studies, "gamma", protocol="running")
    with pytest.raises(click.ClickException) as exc:
        _write(studies, tmp_path / "paper")
    msg = exc.value.message
    assert "precise: alpha, beta" in msg and "running: gamma" in msg and "exoticnorm report" in msg
    assert not (tmp_path / "paper" / "paper.md").exists()


def test_old_format_only_is_an_error_saying_what_to_run(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    _compare(studies, "legacy", protocol=None)
    (studies / "fresh.toml").write_text('question = "?"\n')
    with pytest.raises(click.ClickException) as exc:
        _write(studies, tmp_path / "paper")
    msg = exc.value.message
    assert "no study" in msg and "legacy" in msg and "fresh: no report yet" in msg
    assert "exoticnorm run studies/legacy.toml --jobs 2 && exoticnorm report studies/legacy.toml" in msg


def test_no_studies_is_an_error(tmp_path):
    (tmp_path / "studies").mkdir()
    with pytest.raises(click.ClickException, match="no study"):
        _write(tmp_path / "studies", tmp_path / "paper")
    with pytest.raises(click.ClickException, match="no studies folder"):
        _write(tmp_path / "missing", tmp_path / "paper")


def test_stale_report_protocol_is_not_included(tmp_path):
    studies = _fixture(tmp_path, old=False)
    toml = studies / "alpha.toml"
    toml.write_text(toml.read_text().replace('protocol = "precise"', 'protocol = "running"'))
    md = _write(studies, tmp_path / "paper")
    assert "- `alpha`: the report uses the precise protocol but studies/alpha.toml now asks for running" in md


def test_cli_paper(tmp_path):
    studies = _fixture(tmp_path)
    result = CliRunner().invoke(main, ["paper", "--studies", str(studies), "--out", str(tmp_path / "p"), "--no-pdf"])
    assert result.exit_code == 0, result.output
    assert "2 studies (alpha, beta) under the precise protocol; 1 not included (legacy)" in result.output
    assert not (tmp_path / "p" / "paper.pdf").exists()
    result = CliRunner().invoke(main, ["paper", "--studies", str(tmp_path / "p"), "--no-pdf"])
    assert result.exit_code == 1 and "no study" in result.output


def test_latex_subset():
    assert latex_to_typst(r"W = U \operatorname{diag}((\lambda + \epsilon)^{-1/2}) U^\top") == \
        'W = U "diag" ( ( lambda + epsilon )^(- 1 / 2) ) U^(top)'
    assert latex_to_typst(r"\frac{1}{M} \sum_k \hat\mu_k") == "(1)/(M) sum_(k) hat(mu)_(k)"
    with pytest.raises(ValueError, match="no Typst form"):
        latex_to_typst(r"\unknowncommand x")


def test_copy_of_committed_sources_detects_an_edit(tmp_path):
    """The committed paper's checks fail on a copy with one number changed."""
    _committed()
    copy = tmp_path / "paper"
    shutil.copytree(PAPER, copy)
    sources = json.loads((copy / "sources.json").read_text())
    sources["root"] = str(REPO)
    (copy / "sources.json").write_text(json.dumps(sources))
    prov = json.loads((copy / "provenance.json").read_text())
    prov["root"] = str(REPO)
    (copy / "provenance.json").write_text(json.dumps(prov))
    md = (copy / "paper.md").read_text()
    first = NUMBER.search(md.split("## Abstract", 1)[1]).group()
    (copy / "paper.md").write_text(md.replace(first, first[:-1] + ("1" if first[-1] != "1" else "2"), 1))
    assert untraced(copy) and stale_sources(copy)
