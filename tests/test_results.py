"""`exoticnorm summarize`: seeds grouped, mean ± sample std."""

import json
import statistics

from click.testing import CliRunner

from exoticnorm.cli import main


def _run(tmp_path, name, norm, seed, acc, status="finished", **opts):
    d = tmp_path / name
    d.mkdir()
    config = {"norm": norm, "norm_opts": opts, "seed": seed, "lr": 0.1, "epochs": 10}
    d.joinpath("summary.json").write_text(json.dumps({
        "status": status, "test_acc": acc, "train_acc": acc + 0.01, "train_loss": 0.3,
        "images_per_sec": 1000.0, "config": config}))
    return d


def test_summarize_groups_seeds_and_reports_mean_std(tmp_path):
    dirs = [_run(tmp_path, f"bn{s}", "bn", s, a) for s, a in enumerate([0.80, 0.82, 0.84])]
    dirs += [_run(tmp_path, "gn0", "gn", 0, 0.7, num_groups=2),
             _run(tmp_path, "gn1", "gn", 1, float("nan"), status="diverged", num_groups=2)]
    (tmp_path / "unfinished").mkdir()
    result = CliRunner().invoke(main, ["summarize", *map(str, dirs), str(tmp_path / "unfinished")])
    assert result.exit_code == 0, result.output
    std = statistics.stdev([0.80, 0.82, 0.84])
    assert f"| bn | 3 | 0.8200 ± {std:.4f} |" in result.output
    assert "| gn (num_groups=2) | 1 | 0.7000 |" in result.output and result.output.rstrip().endswith("| 1 |")


def test_summarize_without_finished_runs_is_an_error(tmp_path):
    result = CliRunner().invoke(main, ["summarize", str(tmp_path)])
    assert result.exit_code == 1 and "no finished run" in result.output
