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
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?%|(?<![\w.])[-+−]?\d+(?:\.\d+(?:e[-+]?\d+)?|e[-+]?\d+)")

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

    def values(name, k=key):  # the key of a cell (of the file itself: cell None), minus src["minus"] per seed
        entry = doc if name is None else next((c for c in doc if c["cell"] == name), None)
        if entry is None:
            raise LookupError(f"no cell {name} in {src['file']}")
        v = _lookup(entry, k)
        return [a - b for a, b in zip(v, _lookup(entry, src["minus"]))] if src.get("minus") else v

    try:
        if cell == "*":
            value = [_lookup(c, key) for c in doc]
        elif op == "runs":
            entry = next(c for c in doc if c["cell"] == cell)
            value = entry["n"] + entry["diverged"] + entry["missing"]
        elif op == "ratio":
            value = values(cell) / values(cell, src["over"])
        elif op.startswith("welch."):
            value = _welch(values(cell), values(src["vs"]))[op.removeprefix("welch.")]
        else:
            value = values(cell)
    except (LookupError, StopIteration) as exc:
        return str(exc) or f"no cell {cell} in {src['file']}"
    ops = {"value": lambda v: v, "runs": lambda v: v, "mean": statistics.mean, "std": statistics.stdev,
           "len": len, "sum": sum, "min": min, "max": max, "ratio": lambda v: v}
    got = format(ops.get(op, lambda v: v)(value), src["format"])
    return None if got == printed else f"{src['file']} {cell} {key} {op} gives {got}"


def _welch(a: list[float], b: list[float]) -> dict:
    """Δ = mean(a) − mean(b), Welch's 95% CI and p, by scipy (not exoticnorm.stats); no spread on
    either side: the exact Δ (stats.welch's documented rule)."""
    from scipy.stats import ttest_ind

    delta = statistics.mean(a) - statistics.mean(b)
    if statistics.stdev(a) == 0 and statistics.stdev(b) == 0:
        return {"delta": delta, "ci_low": delta, "ci_high": delta, "p": float(delta == 0)}
    res = ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(confidence_level=0.95)
    return {"delta": delta, "ci_low": ci.low, "ci_high": ci.high, "p": res.pvalue}


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
            doc = json.loads((root / src["file"]).read_text())
            for c in doc if isinstance(doc, list) else []:  # a diagnosis: a dict, no cells
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


BN = [0.870, 0.880, 0.875]
# research: cell → (norm, norm_opts, test acc, train − test gap per seed)
RESEARCH = {
    "bn": ("bn", {}, BN, [0.01, 0.012, 0.011]),
    "zca": ("zca", {}, [0.871, 0.879, 0.874], [0.03, 0.031, 0.029]),
    "zca-pca": ("zca", {"transform": "pca"}, [0.86, 0.861, 0.859], [0.01, 0.01, 0.012]),
    "block-zca-16": ("block-zca", {"group_size": 16}, [0.900, 0.905, 0.902], [0.02, 0.021, 0.019]),
    "monarch-zca": ("monarch-zca", {}, [0.850, 0.852, 0.851], [0.02, 0.02, 0.021]),
    "circulant-zca": ("circulant-zca", {}, [0.86], [0.02]),
    "sparse-zca-0.25": ("sparse-zca", {"density": 0.25}, [0.895, 0.900, 0.898], [0.005, 0.004, 0.006]),
    "sparse-zca-0.5": ("sparse-zca", {"density": 0.5}, [0.870, 0.878, 0.874], [0.03, 0.025, 0.035]),
    "pit-normal": ("pit", {"output": "normal"}, [0.80, 0.81, 0.805], [0.01, 0.011, 0.012]),
    "pit-uniform": ("pit", {"output": "uniform"}, [0.70, 0.72, 0.71], [0.01, 0.013, 0.012]),
}


def _research(studies: Path) -> None:
    cells = []
    for name, (norm, opts, acc, gap) in RESEARCH.items():
        c = _cell(name, {"norm": name}, _config(norm=norm, norm_opts=opts), acc, acc,
                  ref=None if name == "bn" else ("bn", BN))
        c["train_acc"] = [a + g for a, g in zip(acc, gap)]
        cells.append(c)
    _study(studies, "research", 'question = "d2l\'s research ideas: do they work? PIT, ZCA at lr 0.1."\nseeds = 3\n'
                                '[analysis]\nkind = "compare"\nreference = "bn"\nprotocol = "precise"\n', cells)


TWINS = {("rbn", "last-32"): [0.40, 0.55, 0.45], ("rbn", "full"): [0.72, 0.73, 0.71],
         ("bn", "last-32"): [0.72, 0.73, 0.725], ("bn", "full"): [0.721, 0.728, 0.73]}


def _twins(studies: Path) -> None:
    cells = []
    for (norm, train), acc in TWINS.items():
        twin = None if train == "last-32" else (f"{norm}_last-32", TWINS[norm, "last-32"])
        cells.append(_cell(f"{norm}_{train}", {"norm": norm, "train": train}, _config(norm="bn"), acc, acc, ref=twin))
    _study(studies, "twins", 'question = "Is it the last batch? A test."\nseeds = 3\n[analysis]\nkind = "compare"\n'
                             'reference = { train = "last-32" }\nprotocol = "precise"\n', cells)


def _diagnosis(studies: Path, noise: bool = True) -> None:
    folder = studies / "pit-diagnosis"
    folder.mkdir()
    summary = {}
    for i, v in enumerate(("bn", "pit-normal", "pit-uniform")):
        summary[v] = {"train_loss_last100": 0.47 + 0.31 * i, "train_acc_last100": 0.83 - 0.1 * i,
                      "test_acc_running": 0.82 - 0.2 * i, "test_acc_precise": 0.828 - 0.1 * i,
                      "grad_norm_median": {"conv1": 0.35 / (1 + i), "fc3": 0.28 * (1 + i)},
                      "gain_median": {"conv1": 5.4 - i, "fc1": 6.1 / (1 + i)},
                      "slope_median_last": {"conv1": 5.2 - 2 * i, "fc1": 4.9 - i},
                      "seconds": 20.0 + i}
        if noise:
            summary[v]["batch_noise_median"] = {"conv1": 0.027 * (1 + i), "fc1": 0.1 + 0.01 * i}
    (folder / "results.json").write_text(json.dumps({"epochs": 2, "lr": 0.1, "torch": "9.9.9", "summary": summary,
                                                     "per_step": {"bn": {"loss": [1.0, 0.5]}}}, indent=1))
    (folder / "run.py").write_text('"""The diagnosis."""\n')
    (folder / "README.md").write_text("# PIT's gap, diagnosed\n\nOne seed.\n\n![loss.png](loss.png)\n")
    _png(folder / "loss.png", shade=7)


def _ideas(tmp_path: Path, noise: bool = True) -> Path:
    studies = tmp_path / "studies"
    studies.mkdir()
    _research(studies)
    _twins(studies)
    _diagnosis(studies, noise)
    (studies / "later.toml").write_text('question = """\nIs lr 0.3 too large? More text."""\n')
    return studies


def _item(name: str, a: list[float], b: list[float], vs: str | None = None) -> str:
    w = _welch(a, b)
    return (f"`{name}`" + (f" (vs `{vs}`)" if vs else "")
            + f" Δ = {w['delta']:+.4f} [{w['ci_low']:+.4f}, {w['ci_high']:+.4f}]")


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


def test_answers_give_the_verdicts_of_each_question(tmp_path):
    studies = _ideas(tmp_path)
    out = tmp_path / "paper"
    md = _write(studies, out, pdf=HAS_TYPST)
    answers = md.split("## Answers to d2l's questions", 1)[1].split("\n## ", 1)[0]
    acc = {k: v[2] for k, v in RESEARCH.items()}
    gap = {k: v[3] for k, v in RESEARCH.items()}
    line = lambda *names: ", ".join(_item(n, acc[n], BN) for n in names)  # noqa: E731
    assert (f"- **7.1** Can the probability integral transform serve as a norm? (`research`) lower than `bn`: "
            f"{line('pit-normal', 'pit-uniform')}.\n") in answers
    assert f"- **7.2** Can one use a full-rank covariance estimate? (`research`) no detectable difference from `bn`: " \
           f"{line('zca')}.\n" in answers  # zca-pca is not full-rank zca in d2l's sense: with the rest
    assert (f"(`research`) higher than `bn`: {line('block-zca-16')}; lower than `bn`: {line('monarch-zca')}; "
            f"not tested (one run on a side): `circulant-zca` Δ = {statistics.mean(acc['circulant-zca']) - statistics.mean(BN):+.4f}.\n"
            ) in answers
    assert (f"higher than `bn`: {line('sparse-zca-0.25')}; no detectable difference from `bn`: {line('sparse-zca-0.5')}. "
            f"Against dense `zca` (test accuracy): higher than `zca`: {_item('sparse-zca-0.25', acc['sparse-zca-0.25'], acc['zca'])}; "
            f"no detectable difference from `zca`: {_item('sparse-zca-0.5', acc['sparse-zca-0.5'], acc['zca'])}.") in answers
    means = ", ".join(f"`{n}` {statistics.mean(gap[n]):.4f}" for n in ("zca", "sparse-zca-0.25", "sparse-zca-0.5"))
    assert (f"Train − test gap (mean over seeds of train acc − test acc): {means}; against `zca`'s: smaller gap than "
            f"`zca`: {_item('sparse-zca-0.25', gap['sparse-zca-0.25'], gap['zca'])}; no detectable difference from "
            f"`zca`: {_item('sparse-zca-0.5', gap['sparse-zca-0.5'], gap['zca'])}.") in answers
    assert "the cells of no idea: lower than `bn`: " + line("zca-pca") in answers
    assert "One-seed per-step diagnosis `pit-diagnosis` (not a comparison of means, no CI)" in answers
    twin = _item("rbn_full", TWINS["rbn", "full"], TWINS["rbn", "last-32"], "rbn_last-32")
    best = max(TWINS, key=lambda k: statistics.mean(TWINS[k]))
    best_text = f"`{'_'.join(best)}`, {statistics.mean(TWINS[best]):.4f} ± {statistics.stdev(TWINS[best]):.4f}"
    assert (f"- `twins`: Is it the last batch? best {best_text}; higher than its twin with train = "
            f"last-32: {twin}; no detectable difference from its twin with train = last-32: "
            f"{_item('bn_full', TWINS['bn', 'full'], TWINS['bn', 'last-32'], 'bn_last-32')}.\n") in answers
    assert ("- `later`: Is lr 0.3 too large? Unanswered, no report yet (no results.json): run "
            "`exoticnorm run studies/later.toml --jobs 2 && exoticnorm report studies/later.toml`.") in answers
    # the twin study's table names each cell's twin and no stale pairing
    assert "| compared with | Δ vs its twin with train = last-32 |" in md and "Stale report" not in md
    assert "Against its twin with train = last-32 (Δ, 95% CI): higher than its twin with train = last-32: " + twin in md
    # the diagnosis: a section with the ratios, its figure, its inputs hashed; everything traces
    diag = md.split("### Diagnosis `pit-diagnosis`", 1)[1].split("\n## ", 1)[0]
    assert "one seed" in diag and "not a comparison of means" in diag and "CI" not in diag
    assert "| batch_noise_median | `pit-normal` | 2 | – | 1.1 |" in diag  # 0.054 / 0.027, 0.11 / 0.1 (no fc3)
    assert "![pit-diagnosis: loss](../studies/pit-diagnosis/loss.png)" in diag
    prov = json.loads((out / "provenance.json").read_text())
    assert {"kind": "data", "file": "studies/pit-diagnosis/results.json", "study": "pit-diagnosis", "cell": None,
            "key": "summary.pit-uniform.grad_norm_median.fc3", "op": "ratio",
            "over": "summary.bn.grad_norm_median.fc3", "format": ".3g",
            "how": "summary.pit-uniform.grad_norm_median.fc3 / summary.bn.grad_norm_median.fc3"} in prov["numbers"]["3"]
    sources = json.loads((out / "sources.json").read_text())
    assert "studies/pit-diagnosis/results.json" in sources["inputs"] and "studies/later.toml" in sources["inputs"]
    assert "studies/pit-diagnosis/loss.png" in sources["figures"]
    assert "python studies/pit-diagnosis/run.py --epochs 2 --lr 0.1" in md
    assert untraced(out) == []
    assert stale_sources(out, need_pdf=HAS_TYPST) == []


def test_checks_fail_when_a_diagnosis_number_changes(tmp_path):
    studies = _ideas(tmp_path)
    out = tmp_path / "paper"
    md = _write(studies, out)
    assert untraced(out) == []
    row = "| `pit-normal` | 0.7800 | 0.7300 | 0.7280 | 0.6200 |"
    assert row in md
    (out / "paper.md").write_text(md.replace(row, row.replace("0.7800", "0.7801")))
    assert any("'0.7801' is in paper.md but not in provenance.json" in p for p in untraced(out))
    (out / "paper.md").write_text(md)
    results = studies / "pit-diagnosis" / "results.json"
    doc = json.loads(results.read_text())
    doc["summary"]["pit-normal"]["gain_median"]["conv1"] *= 1.5  # a ratio to bn changes
    results.write_text(json.dumps(doc))
    assert any("does not recompute" in p and "gain_median.conv1 ratio" in p for p in untraced(out))
    assert any("studies/pit-diagnosis/results.json changed" in p for p in stale_sources(out, False))


def test_diagnosis_without_batch_noise_and_research_not_run(tmp_path):
    studies = _ideas(tmp_path, noise=False)
    shutil.rmtree(studies / "research")
    md = _write(studies, tmp_path / "paper")
    assert "batch_noise" not in md and "| gain_median | `pit-uniform` |" in md
    assert ("- **7.4** Does a sparsification compression act as a regularizer? Unanswered, `research`: no report yet "
            "(no results.json); run `exoticnorm run studies/research.toml --jobs 2 && exoticnorm report "
            "studies/research.toml`.") in md
    assert "One-seed per-step diagnosis `pit-diagnosis`" in md.split("- **7.2**")[0]
    assert untraced(tmp_path / "paper") == []


def test_a_stale_twin_pairing_is_flagged(tmp_path):
    studies = _ideas(tmp_path)
    results = studies / "twins" / "results.json"
    cells = json.loads(results.read_text())
    cells[3]["vs_reference"]["reference"] = "rbn_last-32"  # bn_full against another cell than its twin
    results.write_text(json.dumps(cells))
    md = _write(studies, tmp_path / "paper")
    assert "**Stale report:** `bn_full` are compared in results.json with another cell than its twin" in md
    assert "(stale report: some cells not against their twin, see Results)." in md.split("## Methods")[0]


def _probe(studies: Path, study: str = "alpha", summary: dict | None = None) -> Path:
    folder = studies / "pit-diagnosis"
    folder.mkdir(exist_ok=True)
    summary = summary or {"all_eval": {"mean": 0.3115, "std": 0.2107}, "all_batch": {"mean": 0.6839, "std": 0.0063},
                          "all_eval_sequential": {"mean": 0.6781, "std": 0.011}}
    path = folder / "resnet-eval.json"
    path.write_text(json.dumps({"study": study, "images": 500, "summary": summary, "runs": {}}))
    return path


def test_an_eval_probe_joins_its_study_traced_and_tracked(tmp_path):
    studies = _fixture(tmp_path, old=False)
    probe = _probe(studies)
    out = tmp_path / "paper"
    md = _write(studies, out)
    section = md.split("### Study `alpha`")[1].split("### Study `beta`")[0]
    assert "**Where PIT's eval accuracy goes**" in section and "the first 500 test images" in section
    assert "accuracy 0.3115 ± 0.2107" in section and "the sketches give 0.6781 ± 0.0110" in section
    assert untraced(out) == [] and stale_sources(out, False) == []
    prov = json.loads((out / "provenance.json").read_text())
    assert {"kind": "data", "file": "studies/pit-diagnosis/resnet-eval.json", "study": "pit-diagnosis/resnet-eval",
            "cell": None, "key": "summary.all_batch.mean", "op": "value", "format": ".4f",
            "how": "summary.all_batch.mean of the cell"} in prov["numbers"]["0.6839"]
    doc = json.loads(probe.read_text())
    doc["summary"]["all_eval_sequential"]["mean"] = 0.5
    probe.write_text(json.dumps(doc))
    assert any("does not recompute" in p for p in untraced(out))
    assert any("studies/pit-diagnosis/resnet-eval.json changed" in p for p in stale_sources(out, False))


def test_a_malformed_eval_probe_is_an_error_saying_what_to_do(tmp_path):
    studies = _fixture(tmp_path, old=False)
    _probe(studies, summary={"all_eval": {"mean": 0.3, "std": 0.2}})
    with pytest.raises(click.ClickException, match="resnet-eval.json: not an eval probe .*rewrite it with its script"):
        _write(studies, tmp_path / "paper")
    (studies / "pit-diagnosis" / "resnet-eval.json").write_text("{")
    with pytest.raises(click.ClickException, match="not an eval probe"):
        _write(studies, tmp_path / "paper")
    _probe(studies)
    (studies / "pit-diagnosis" / "other-eval.json").write_text((studies / "pit-diagnosis" / "resnet-eval.json").read_text())
    with pytest.raises(click.ClickException, match="both probe study 'alpha'; keep one"):
        _write(studies, tmp_path / "paper")
