"""Studies (studies/*.toml, exoticnorm/study.py), `exoticnorm run`/`run-cell`/`report`, on fake and real data."""

import json
import os
import statistics
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from exoticnorm import data
from exoticnorm.analysis import KINDS
from exoticnorm.cli import main
from exoticnorm.study import StudyError, load_study, parse_shard
from exoticnorm.points import PROTOCOLS
from exoticnorm.report import build_wandb_report, collect, wandb_report_for
from exoticnorm.runner import cell_state, run_cells, select_shard

STUDIES = Path(__file__).resolve().parents[1] / "studies"
REQUIRED = {"bias", "lr-region", "placement", "dropout", "affine", "zoo", "research", "whitening-lenet", "pit-lenet",
            "resnet", "running-bn-last-batch"}
HAVE_REAL_DATA = data.find_idx_dir(data.DEBIAN_DIR) is not None


def cli(*args):
    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


def write_study(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY = """
question = "a tiny study on fake data"
seeds = 2
[analysis]
kind = "lr"
x = "lr"
facet = "norm"
[base]
epochs = 2
batch_size = 64
limit_test = 64
activation = "relu"
[grid]
norm = ["bn", "none"]
lr = [0.05, 1e7]
[quick]
seeds = 1
grid = { lr = [0.05] }
"""


@pytest.fixture
def tiny(tmp_path):
    return write_study(tmp_path / "tiny.toml", TINY)


# ------------------------------------------------------------------ study files


@pytest.mark.parametrize("quick", [False, True])
def test_every_required_study_exists_and_loads(quick):
    names = {p.stem for p in STUDIES.glob("*.toml")}
    assert REQUIRED <= names
    for name in names:
        study = load_study(STUDIES / f"{name}.toml", quick=quick)
        assert len(study.question) > 40, name  # the question is written at the top
        assert study.cells and len(study.cells) == len(study.points()) * len(study.seeds)
        assert study.analysis.get("kind") in KINDS
        assert study.analysis["protocol"] in PROTOCOLS, name  # stated in every study file
        if not quick:
            assert len(study.seeds) >= 3, name
        else:
            assert len(study.seeds) <= 2 and all(c.config.epochs <= 2 for c in study.cells), name


def test_lr_region_grid_is_log_spaced_from_0_01_to_30_over_every_exotic_norm():
    study = load_study(STUDIES / "lr-region.toml")
    lrs = sorted({c.config.lr for c in study.cells})
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(30.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) / min(ratios) < 1.25  # about evenly spaced in log
    norms = {c.config.norm for c in study.cells}
    assert {"none", "bn", "zca", "block-zca", "sparse-zca", "pit"} <= norms
    zoo = load_study(STUDIES / "zoo.toml")
    assert {c.config.batch_size for c in zoo.cells} == {2, 4, 8, 16, 32, 64, 128, 256}
    assert {c.config.norm for c in zoo.cells} == {"bn", "ln", "in", "gn", "running-bn"}


@pytest.mark.parametrize("text, message", [
    ("seeds = 2", "question"),
    ('question = "q"\nbogus = 1', "unknown top-level key"),
    ('question = "q"\n[base]\nlearning_rate = 0.1', "unknown setting(s) learning_rate"),
    ('question = "q"\n[grid]\nnorm = []', "non-empty list"),
    ('question = "q"\n[grid]\nvariant = ["a"]', "plain values need the axis to be a setting"),
    ('question = "q"\n[grid]\nnorm = [{norm = "bn"}]', "needs a label"),
    ('question = "q"\n[grid]\nnorm = [{label = "a b", norm = "bn"}]', "may only hold"),
    ('question = "q"\n[grid]\nnorm = ["bn", "bn"]', "labels repeat"),
    ('question = "q"\n[grid]\nnorm = ["bnn"]', "cell bnn"),
    ('question = "q"\n[grid]\nnorm = [{label = "g", norm = "gn", norm_opts = {num_groups = 5}}]',
     "does not divide"),
    ('question = "q"\n[grid]\na = [{label = "x", lr = 0.1}]\nb = [{label = "y", lr = 0.2}]', "another axis"),
    ('question = "q"\n[quick]\ngrid = {lr = [0.1]}', "not an axis"),
    ('question = "q"\nseeds = 0', "positive integer"),
    ('question = "q', "not valid TOML"),
    ('question = "q"\n[analysis]\nkind = "lr"', "needs analysis.x"),
    ('question = "q"\n[analysis]\nkind = "best"', "analysis.kind must be"),
    ('question = "q"\n[analysis]\nkind = "lr"\nx = "rate"', "analysis.x must be a setting"),
    ('question = "q"\n[analysis]\nprotocol = "exact"', "analysis.protocol must be one of precise, running"),
    ('question = "q"\n[analysis]\nreference = "zz"\n[grid]\nnorm = ["bn"]', "analysis.reference 'zz'"),
    ('question = "q"\n[analysis]\nfacet = "zz"\n[grid]\nnorm = ["bn"]', "analysis.facet must be a grid axis"),
    ('question = "q"\n[base]\nlr = 0.2\n[grid]\na = [{label = "x", lr = 0.1}]\nb = [{label = "y", lr = 0.3}]',
     "another axis"),
])
def test_bad_study_files_get_clear_errors(tmp_path, text, message):
    path = write_study(tmp_path / "bad.toml", text)
    with pytest.raises(StudyError, match="bad.toml") as info:
        load_study(path)
    assert message in str(info.value)
    result = cli("run", path)
    assert result.exit_code != 0 and message in result.output


def test_missing_study_file_and_bad_shard(tmp_path):
    assert "no such study file" in cli("run", tmp_path / "nope.toml").output
    for bad in ("0/2", "3/2", "1-2", "x"):
        with pytest.raises(StudyError, match="--shard"):
            parse_shard(bad)


def test_shards_partition_the_cells(tiny):
    study = load_study(tiny)
    for n in (1, 2, 3, 5):
        shards = [select_shard(study.cells, (i, n)) for i in range(1, n + 1)]
        names = [c.run_name for s in shards for c in s]
        assert sorted(names) == sorted(c.run_name for c in study.cells) and len(set(names)) == len(names)


def test_quick_form_and_seed_override(tiny):
    assert len(load_study(tiny).cells) == 8
    quick = load_study(tiny, quick=True)
    assert len(quick.cells) == 2 and quick.run_dir_name == "tiny-quick"
    assert len(load_study(tiny, seeds=5).cells) == 20
    first = load_study(tiny).cells
    assert [c.config.seed for c in first[:4]] == [0, 0, 0, 0]  # seed-major order


# ------------------------------------------------------------------ running


def test_run_skips_finished_resumes_killed_and_keeps_mismatched(tmp_path, tiny, fake_data):
    from exoticnorm.train import train_run

    study = load_study(tiny)
    out = tmp_path / "runs"
    killed = study.cells[0]
    train_run(killed.config, out / killed.run_name, data_dir=fake_data, device="cpu",
              stop_after=1, echo=lambda s: None)
    assert cell_state(killed, out) == "partial"
    log = []
    counts = run_cells(study, out, data_dir=str(fake_data), download=False, device="cpu", echo=log.append)
    assert counts["finished"] + counts["diverged"] == 8 and counts["failed"] == 0
    assert counts["diverged"] >= 1  # lr 1e7 blows up
    assert any(killed.run_name in line and "resumed" in line for line in log)
    assert json.loads((out / killed.run_name / "summary.json").read_text())["epochs_done"] == 2
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    log.clear()
    counts = run_cells(study, out, data_dir=str(fake_data), download=False, device="cpu", echo=log.append)
    assert counts["done"] == 8 and "0 to run" in log[0]
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}

    # the user edits the study (other settings, or more epochs for finished runs): the folders
    # are kept as they are, reported, and left out of the report
    for edited in (TINY.replace("batch_size = 64", "batch_size = 32"), TINY.replace("epochs = 2", "epochs = 3")):
        write_study(tiny, edited)
        result = cli("run", tiny, "--out", out, "--data-dir", fake_data, "--no-download", "--device", "cpu")
        assert result.exit_code == 1 and "holds a run made with other settings" in result.output
        assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
        points = collect(load_study(tiny), out)
        assert all(p.mismatched == 2 and not p.summaries for p in points)
        result = cli("report", tiny, "--runs", out, "--out", tmp_path / "stale-report")
        assert result.exit_code == 0 and "left out" in (tmp_path / "stale-report" / "README.md").read_text()


def test_parallel_jobs_and_shards_match_sequential(tmp_path, tiny, fake_data):
    kw = dict(data_dir=str(fake_data), download=False, device="cpu", echo=lambda s: None)
    study = load_study(tiny, quick=True)
    study = load_study(tiny, seeds=2, quick=True)  # 4 cells
    run_cells(study, tmp_path / "seq", **kw)
    for i in (1, 2):  # two "machines", each running its shard with 2 processes
        counts = run_cells(study, tmp_path / "par", jobs=2, shard=(i, 2), **kw)
        assert counts["finished"] == 2
    for cell in study.cells:
        a = json.loads((tmp_path / "seq" / cell.run_name / "summary.json").read_text())
        b = json.loads((tmp_path / "par" / cell.run_name / "summary.json").read_text())
        assert a["test_acc"] == b["test_acc"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-2)  # threads differ
        assert "log.txt" in os.listdir(tmp_path / "par" / cell.run_name)


def test_sweep_export_and_run_cell(tmp_path, tiny, fake_data, monkeypatch):
    sweep = tmp_path / "sweep.yaml"
    result = cli("run", tiny, "--export-sweep", sweep)
    assert result.exit_code == 0 and "wandb sweep" in result.output
    config = yaml.safe_load(sweep.read_text())
    assert config["method"] == "grid" and config["command"][-1] == "${args}"
    assert config["parameters"] == {"norm": {"values": ["bn", "none"]},
                                    "lr": {"values": ["lr-0.05", "lr-10000000.0"]},
                                    "seed": {"values": [0, 1]}}
    assert not (tmp_path / "runs").exists()  # exporting runs nothing
    # what `wandb agent` calls for one grid point
    monkeypatch.setenv("EXOTICNORM_DATA", str(fake_data))
    out = tmp_path / "runs"
    result = cli("run-cell", tiny, "--out", out, "--device", "cpu", "--norm=none", "--lr=lr-0.05", "--seed=1")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "none_lr-0.05-s1" / "summary.json").read_text())["config"]["seed"] == 1
    assert "no cell" in cli("run-cell", tiny, "--out", out, "--norm=gn", "--lr=lr-0.05", "--seed=0").output
    assert "integer" in cli("run-cell", tiny, "--norm=bn", "--lr=lr-0.05", "--seed=one").output
    # a sweep over more seeds than the study's passes them on to run-cell
    cli("run", tiny, "--seeds", 4, "--export-sweep", sweep)
    config = yaml.safe_load(sweep.read_text())
    assert config["parameters"]["seed"] == {"values": [0, 1, 2, 3]} and "--seeds=4" in config["command"]


# ------------------------------------------------------------------ reports (on fake runs: test_report.py)


def test_report_end_to_end_on_fake_data(tmp_path, tiny, fake_data):
    study = load_study(tiny)
    runs = tmp_path / "runs"
    run_cells(study, runs, data_dir=str(fake_data), download=False, device="cpu", echo=lambda s: None)
    out = tmp_path / "report"
    result = cli("report", tiny, "--runs", runs, "--out", out)
    assert result.exit_code == 0, result.output
    readme = (out / "README.md").read_text()
    assert "a tiny study on fake data" in readme and "largest converging lr" in readme
    for name in ("accuracy_per_epoch", "accuracy_vs_lr", "activations_first_batches", "activations_per_batch",
                 "activations_histogram", "activations_saturated", "epoch_time"):
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, name
        assert f"({name}.png)" in readme
    results = {r["cell"]: r for r in json.loads((out / "results.json").read_text())}
    assert results["bn_lr-0.05"]["n"] == 2 and len(results["bn_lr-0.05"]["test_acc"]) == 2
    assert results["bn_lr-0.05"]["test_acc"] == results["bn_lr-0.05"]["test_acc_precise"]
    assert results["none_lr-10000000.0"]["diverged"] == 2
    # the table's mean ± std is the statistics of the runs' summaries
    for key in ("test_acc_running", "test_acc_precise"):  # bn keeps statistics: both columns
        accs = [json.loads((runs / f"bn_lr-0.05-s{s}" / "summary.json").read_text())[key] for s in (0, 1)]
        assert f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}" in readme
    assert "**Eval protocol:** precise statistics from up to 100 training batches" in readme
    # a runs folder works as the source too
    assert cli("report", runs, "--out", tmp_path / "again").exit_code == 0
    assert "no runs folder" in cli("report", tiny, "--runs", tmp_path / "nothing", "--out", out).output


def test_wandb_report_offline_says_how_to_sync_and_builds_panels_online(tiny, monkeypatch):
    study = load_study(tiny)
    said = []
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_report_for(study, echo=said.append) is None
    assert "wandb sync runs/studies/tiny/" in said[0] and "wandb login" in said[0]
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    report = build_wandb_report(study, wr, entity="someone", project="exoticnorm")
    grid = report.blocks[-1]
    assert grid.runsets[0].groupby == ["norm", "lr"]
    assert "tiny" in str(grid.runsets[0].filters)
    assert {p.title for p in grid.panels} >= {"test_acc_precise per epoch", "test accuracy (precise) vs lr"}
    # saving needs a login and the network: the boundary we stop at
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(Exception, match="(?i)log"):
        report.save()


@pytest.mark.skipif(not HAVE_REAL_DATA, reason="real FashionMNIST not installed (scripts/setup.sh)")
@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_study_runs_quick_and_reports(tmp_path, name):
    """The quick form of every study on real FashionMNIST: cells, table and figures."""
    runs, out = tmp_path / "runs", tmp_path / "report"
    result = cli("run", STUDIES / f"{name}.toml", "--quick", "--out", runs, "--jobs", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    result = cli("report", STUDIES / f"{name}.toml", "--quick", "--runs", runs, "--out", out)
    assert result.exit_code == 0, result.output
    study = load_study(STUDIES / f"{name}.toml", quick=True)
    points = collect(study, runs)
    assert all(p.missing == 0 for p in points)
    readme = (out / "README.md").read_text()
    assert "## Answer" in readme and all(f"| {p.key} |" in readme for p in points)
    assert (out / "accuracy_per_epoch.png").exists() and (out / "epoch_time.pdf").exists()
    if study.analysis.get("x"):
        assert (out / f"accuracy_vs_{study.analysis['x']}.png").exists()
    for sweep in study.analysis.get("sweeps", []):
        assert (out / f"accuracy_vs_{sweep['option']}.png").exists()
