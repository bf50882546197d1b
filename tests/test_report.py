"""`exoticnorm report` on fake run folders: Welch statistics, the eval protocol, old runs,
results.json and the per-batch activation figures."""

import json
import math
import statistics

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats as sps

from exoticnorm.analysis import KINDS, answer
from exoticnorm.cli import main
from exoticnorm.figures import _saturated_bins, focus_runs
from exoticnorm.study import StudyError, config_dict, load_study
from exoticnorm.points import PointResult
from exoticnorm.report import collect, make_report, table
from exoticnorm.stats import welch

COMPARE = """
question = "a fake compare study: bn (keeps statistics) against ln and none (keep none)"
seeds = 3
[analysis]
kind = "compare"
reference = "bn"
{protocol}
[base]
epochs = 2
[grid]
norm = ["bn", "ln", "none"]
"""

# per cell and seed: (test_acc_running, test_acc_precise); ln and none keep no statistics
ACCS = {"bn": [(0.70, 0.80), (0.74, 0.81), (0.66, 0.82)],
        "ln": [(0.78, 0.78), (0.80, 0.80), (0.79, 0.79)],
        "none": [(0.60, 0.60), (0.65, 0.65), (0.62, 0.62)]}
STEPS = 30  # training steps per epoch of the fake runs


def fake_activations(sites, epochs, steps=STEPS, hist_every=10, seed=0):
    """An ``activations.pt`` dict as train.py writes it, with random values."""
    g = torch.Generator().manual_seed(seed)
    t, s = epochs * steps, len(sites)
    hist_step = torch.arange(0, t, hist_every)
    hist = torch.rand(len(hist_step), s, 18, generator=g)
    edges = torch.cat([torch.tensor([-math.inf]), torch.linspace(-4, 4, 17), torch.tensor([math.inf])])
    return {"sites": list(sites), "steps_per_epoch": steps, "mean": torch.randn(t, s, generator=g),
            "std": torch.rand(t, s, generator=g) + 0.5, "hist_every": hist_every, "hist_step": hist_step,
            "hist": hist / hist.sum(-1, keepdim=True), "hist_edges": edges}


def fake_run(runs, cell, running, precise, old=False, activations=True):
    """A finished run folder (summary.json, metrics.jsonl, activations.pt) for ``cell``;
    ``old``: recorded before the two protocols (test_acc only)."""
    d = runs / cell.run_name
    d.mkdir(parents=True, exist_ok=True)
    epochs = cell.config.epochs
    keeps = cell.config.norm == "bn"
    protocols = {"test_acc_running": running, "test_acc_precise": precise, "test_loss_running": 1 - running,
                 "test_loss_precise": 1 - precise, "precise_norms": 4 if keeps else 0}
    rows = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": precise - 0.1 * (epochs - e), "test_acc": precise,
             "test_loss": 1 - precise, "epoch_time": 2.0, **({} if old else protocols)}
            for e in range(1, epochs + 1)]
    d.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"status": "finished", "epochs_done": epochs, "train_acc": rows[-1]["train_acc"],
               "train_loss": rows[-1]["train_loss"], "test_acc": precise, "test_loss": 1 - precise,
               "parameters": 44426, "device": "cpu", "torch": torch.__version__,
               "config": config_dict(cell.config), **({} if old else protocols)}
    d.joinpath("summary.json").write_text(json.dumps(summary))
    if activations:
        sites = list(cell.config.build_model().norms())
        torch.save(fake_activations(sites, epochs, seed=cell.config.seed), d / "activations.pt")
    return d


@pytest.fixture
def fake_study(tmp_path):
    path = tmp_path / "fake.toml"
    path.write_text(COMPARE.format(protocol=""))
    return load_study(path)


@pytest.fixture
def compare_study(tmp_path):
    """make(protocol line, run names without activations.pt) → the study and its fake runs."""
    def make(protocol="", skip_activations=()):
        path = tmp_path / "fake.toml"
        path.write_text(COMPARE.format(protocol=protocol))
        study = load_study(path)
        for cell in study.cells:
            running, precise = ACCS[cell.key][cell.config.seed]
            fake_run(tmp_path / "runs", cell, running, precise, activations=cell.run_name not in skip_activations)
        return study, tmp_path / "runs"
    return make


def _point(key, accs, labels=None, config=None, diverged=0, params=100, running=None):
    p = PointResult(key, labels or {}, config or {})
    for i, a in enumerate(accs):
        p.summaries.append({"status": "finished", "test_acc_precise": a, "train_acc": a, "parameters": params,
                            "test_acc_running": a if running is None else running[i]})
    p.summaries += [{"status": "diverged"}] * diverged
    return p


# ------------------------------------------------------------------ statistics


def _welch_by_hand(a, b):
    """Δ, the 95% CI and p from the Welch formulas, float64 (scipy only for t's quantiles)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    delta = a.mean() - b.mean()
    half = sps.t.ppf(0.975, df) * se
    return delta, delta - half, delta + half, 2 * sps.t.sf(abs(delta) / se, df), df


@pytest.mark.parametrize("a, b", [
    ([0.81, 0.83, 0.80, 0.84], [0.78, 0.80, 0.79]),  # unequal n and spread
    ([0.0, 0.1, 0.2], [0.2, 0.3, 0.4]),  # equal variances: ν = 4
    ([0.5, 0.9], [0.70, 0.71, 0.72, 0.69, 0.70]),  # one noisy side
])
def test_welch_interval_and_p_match_the_formula(a, b):
    delta, lo, hi, p, df = _welch_by_hand(a, b)
    d = welch(a, b)
    assert (d.n, d.n_ref) == (len(a), len(b)) and d.tested
    assert d.delta == pytest.approx(delta, rel=1e-12)
    assert d.ci_low == pytest.approx(lo, rel=1e-9) and d.ci_high == pytest.approx(hi, rel=1e-9)
    assert d.p == pytest.approx(p, rel=1e-9) and d.df == pytest.approx(df, rel=1e-12)
    assert d.verdict().startswith("no detectable") == (lo <= 0 <= hi)
    assert d.as_dict() == {"delta": d.delta, "ci_low": d.ci_low, "ci_high": d.ci_high, "p": d.p,
                           "n": len(a), "n_ref": len(b)}


def test_welch_verdicts_and_the_cases_without_a_test():
    assert welch([0.0, 0.1, 0.2], [0.2, 0.3, 0.4]).verdict().startswith("no detectable")  # |Δ| 0.2 < 0.227
    assert welch([0.70, 0.71, 0.72], [0.80, 0.81, 0.82]).verdict() == "lower"
    assert welch([0.90, 0.91, 0.92], [0.80, 0.81, 0.82]).verdict() == "higher"
    one = welch([0.8], [0.70, 0.72])
    assert not one.tested and one.verdict() == "one run on a side, no test"
    assert one.text() == "Δ = +0.0900 (n = 1 vs 2): one run on a side, no test"
    assert one.as_dict() == {"delta": pytest.approx(0.09), "ci_low": None, "ci_high": None, "p": None,
                             "n": 1, "n_ref": 2}
    assert welch([], [0.7, 0.8]).verdict() == "not run yet"
    stuck = welch([0.1, 0.1, 0.1], [0.2, 0.2])  # no spread on either side: Δ is exact
    assert (stuck.ci_low, stuck.ci_high, stuck.p, stuck.verdict()) == (pytest.approx(-0.1), pytest.approx(-0.1),
                                                                        0.0, "lower")
    assert welch([0.1, 0.1], [0.1, 0.1]).verdict().startswith("no detectable")


def test_saturation_bins_are_the_whole_bins_beyond_3():
    edges = [-math.inf, *np.linspace(-4, 4, 17).tolist(), math.inf]
    assert _saturated_bins(edges) == ([0, 1, 2, 15, 16, 17], "|y| > 3")


# ------------------------------------------------------------------ answers


def test_compare_answer_gives_delta_with_welch_ci(fake_study):
    study = fake_study
    study.analysis = {"kind": "compare", "reference": "ref"}
    ref, same, worse = [0.80, 0.81, 0.82], [0.805, 0.815, 0.80], [0.70, 0.71, 0.72]
    text = answer([_point("ref", ref), _point("same", same, params=90), _point("worse", worse)], study)
    delta, lo, hi, p, _ = _welch_by_hand(worse, ref)
    assert f"- worse: Δ = {delta:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}], p = {p:.2g}: lower" in text
    delta, lo, hi, p, _ = _welch_by_hand(same, ref)
    assert lo < 0 < hi
    assert (f"- same: Δ = {delta:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}], p = {p:.2g}: no detectable "
            "difference (the 95% CI contains 0); -10 parameters (90 vs 100)") in text
    assert "Highest mean test accuracy (precise statistics): **ref**" in text
    text = answer([_point("ref", ref), _point("one", [0.9])], study)
    assert "- one: Δ = +0.0900 (n = 1 vs 3): one run on a side, no test" in text


def test_compare_against_each_cells_twin(fake_study):
    """reference = {axis = label}: every cell against the cell with the same other labels."""
    study = fake_study
    study.analysis = {"kind": "compare", "reference": {"train": "short"}}
    accs = {("a", "short"): [0.5, 0.6, 0.4], ("a", "long"): [0.8, 0.81, 0.79],
            ("b", "short"): [0.7, 0.71, 0.72], ("b", "long"): [0.7, 0.72, 0.71]}
    points = [_point(f"{n}_{t}", v, labels={"norm": n, "train": t}) for (n, t), v in accs.items()]
    text = answer(points, study)
    delta, lo, hi, p, _ = _welch_by_hand(accs["a", "long"], accs["a", "short"])
    assert f"- a_long vs a_short: Δ = {delta:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}], p = {p:.2g}" in text
    delta, *_ = _welch_by_hand(accs["b", "long"], accs["b", "short"])
    assert f"- b_long vs b_short: Δ = {delta:+.4f}" in text
    assert "a_short vs" not in text and "b_short vs" not in text and "twin with train = short" in text


def test_a_table_reference_must_name_an_axis_and_its_label(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(COMPARE.format(protocol="").replace('reference = "', 'reference = { norm = "nope" } #'))
    with pytest.raises(StudyError, match="one grid axis and one of its labels"):
        load_study(path)


def test_lr_answer_finds_the_largest_converging_lr(fake_study):
    study = fake_study
    study.analysis = {"kind": "lr", "x": "lr", "facet": "norm", "min_train_acc": 0.5}
    pts = [
        _point("bn_a", [0.8, 0.8], {"norm": "bn"}, {"lr": 0.1}),
        _point("bn_b", [0.85, 0.9], {"norm": "bn"}, {"lr": 1.0}),
        _point("bn_c", [0.3, 0.9], {"norm": "bn"}, {"lr": 10.0}),  # one seed below 0.5
        _point("none_a", [0.6, 0.6], {"norm": "none"}, {"lr": 0.1}),
        _point("none_b", [0.7], {"norm": "none"}, {"lr": 1.0}, diverged=1),
    ]
    text = answer(pts, study)
    assert "| bn | 1.0 | 10.0 |" not in text  # bn_c does not count as converged
    assert "| bn | 1.0 | 1.0 | 0.8750 ± 0.0354 | 0 |" in text
    assert "| none | 0.1 | 1.0 | 0.7000 | 1 |" in text


def test_batch_answer_uses_the_studys_protocol(fake_study):
    study = fake_study
    study.analysis = {"kind": "batch", "x": "batch_size", "facet": "norm", "reference": "bn",
                      "protocol": "running"}
    pts = [_point(f"{n}_b{b}", [0.5, 0.6], {"norm": n}, {"batch_size": b}, running=r)
           for n, r in (("bn", [0.80, 0.81]), ("ln", [0.60, 0.62])) for b in (2, 256)]
    text = answer(pts, study)
    assert "| bn | 0.805 ± 0.007 | 0.805 ± 0.007 |" in text  # the running values, not 0.55
    assert "At batch size 2 the best is **bn**" in text and "- ln vs bn: Δ = -0.1950" in text
    assert set(KINDS) == {"compare", "lr", "batch"}


def test_table_shows_both_protocols_only_where_they_differ(fake_study):
    study = fake_study
    same = [_point("a", [0.8, 0.9]), _point("b", [0.7, 0.75])]
    text = table(same, study)
    assert "| test acc | train acc |" in text and "running" not in text
    differ = same + [_point("c", [0.8, 0.9], running=[0.6, 0.7])]
    text = table(differ, study)
    assert "| test acc running | test acc precise | train acc |" in text
    assert "| c | 2/3 | 0 | 0.6500 ± 0.0707 | 0.8500 ± 0.0707 |" in text
    assert all(line.count("|") == text.splitlines()[0].count("|") for line in text.splitlines())


# ------------------------------------------------------------------ reports of fake runs


def test_report_refuses_runs_recorded_under_the_old_protocol(tmp_path, compare_study):
    study, runs = compare_study()
    olds = [c for c in study.cells if c.key in ("ln", "none") and c.config.seed < 2][:3]
    for cell in olds:
        (runs / cell.run_name / "summary.json").unlink()
        fake_run(runs, cell, 0.7, 0.7, old=True)
    with pytest.raises(StudyError) as info:
        collect(study, runs)
    msg = str(info.value)
    assert "3 run(s)" in msg and "ln, none" in msg and "old per-norm eval protocol" in msg
    assert f"exoticnorm run {study.path} --out {runs}" in msg
    result = CliRunner().invoke(main, ["report", str(study.path), "--runs", str(runs), "--out",
                                       str(tmp_path / "report")])
    assert result.exit_code == 1 and "old per-norm eval protocol" in result.output
    assert not (tmp_path / "report" / "README.md").exists()
    assert all((runs / c.run_name / "summary.json").exists() for c in study.cells)  # nothing deleted


@pytest.mark.parametrize("protocol", ["precise", "running"])
def test_report_results_json_and_readme_follow_the_protocol(tmp_path, compare_study, protocol):
    study, runs = compare_study(f'protocol = "{protocol}"')
    out = tmp_path / "report"
    make_report(study, runs, out, echo=lambda s: None)
    results = {r["cell"]: r for r in json.loads((out / "results.json").read_text())}
    col = 0 if protocol == "running" else 1
    for cell, accs in ACCS.items():
        r = results[cell]
        assert r["protocol"] == protocol and r["seeds"] == [0, 1, 2]
        assert r["test_acc_running"] == [a for a, _ in accs] and r["test_acc_precise"] == [b for _, b in accs]
        assert r["test_acc"] == [a[col] for a in accs]
    assert "vs_reference" not in results["bn"]
    want = welch([a[col] for a in ACCS["ln"]], [a[col] for a in ACCS["bn"]])
    assert results["ln"]["vs_reference"] == {"reference": "bn", **want.as_dict()}
    assert results["ln"]["vs_reference"]["ci_low"] < results["ln"]["vs_reference"]["ci_high"]
    readme = (out / "README.md").read_text()
    assert f"- ln: {want.text()}" in readme
    assert "| cell | n | diverged | test acc running | test acc precise |" in readme
    bn_running = [a for a, _ in ACCS["bn"]]
    assert f"| bn | 3/3 | 0 | {statistics.mean(bn_running):.4f} ± {statistics.stdev(bn_running):.4f} |" in readme
    sentence = {"precise": "**Eval protocol:** precise statistics from up to 100 training batches with the "
                           "final weights, the same for every norm; the table shows test accuracy under both",
                "running": "**Eval protocol:** the running statistics as training left them (d2l's "
                           "evaluation), the same for every norm;"}[protocol]
    assert sentence in readme


def test_activation_figures_from_activations_pt(tmp_path, compare_study):
    study, runs = compare_study(skip_activations=("ln-s0",))
    out = tmp_path / "report"
    make_report(study, runs, out, echo=lambda s: None)
    readme = (out / "README.md").read_text()
    for name in ("activations_first_batches", "activations_per_batch", "activations_histogram",
                 "activations_saturated", "accuracy_per_epoch", "epoch_time"):
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, name
        assert f"({name}.png)" in readme
    assert not (out / "activations.png").exists()
    assert "1 of the 3 chosen run(s) (seed 0: ln) have no activations.pt" in readme


def test_focus_picks_the_first_seeds_runs_of_the_chosen_cells(compare_study):
    study, runs = compare_study()
    points = collect(study, runs)
    assert [(p.key, d) for p, d in focus_runs(points, study)] == [(k, runs / f"{k}-s0") for k in ACCS]
    study.analysis["focus"] = {"norm": "ln"}
    assert [(p.key, d) for p, d in focus_runs(points, study)] == [("ln", runs / "ln-s0")]
    study.analysis["focus"] = {"norm": ["none", "bn"]}
    assert [p.key for p, _ in focus_runs(points, study)] == [k for k in ACCS if k in ("none", "bn")]
