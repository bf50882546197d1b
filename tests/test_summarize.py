"""`exoticnorm summarize` (report.summarize): run folders grouped by config except the seed,
mean ± sample std under both eval protocols; runs from before them in a column of their own."""

import json
import statistics

from click.testing import CliRunner

from exoticnorm.cli import main


def _run(tmp_path, name, norm, seed, acc, status="finished", old=False, lr=0.1, **opts):
    """A run folder with summary.json; ``old``: recorded before the two protocols (and before
    later config fields), so only the bare ``test_acc``."""
    d = tmp_path / name
    d.mkdir()
    config = {"norm": norm, "norm_opts": opts, "seed": seed, "lr": lr, "epochs": 10}
    protocols = {} if old else {"test_acc_running": acc - 0.05, "test_acc_precise": acc}
    d.joinpath("summary.json").write_text(json.dumps({
        "status": status, "test_acc": acc, **protocols, "train_acc": acc + 0.01, "train_loss": 0.3,
        "images_per_sec": 1000.0, "config": config}))
    return d


def _rows(output):
    """(label, cells) of each table row."""
    return [(cells[0], cells[1:]) for cells in
            (line.strip("| ").split(" | ") for line in output.splitlines() if line.startswith("| "))][1:]


def test_summarize_groups_seeds_and_keeps_old_protocol_runs_apart(tmp_path):
    dirs = [_run(tmp_path, f"bn{s}", "bn", s, a) for s, a in enumerate([0.80, 0.82, 0.84])]
    dirs += [_run(tmp_path, f"old-bn{s}", "bn", s, a, old=True) for s, a in enumerate([0.60, 0.70])]
    dirs += [_run(tmp_path, "gn0", "gn", 0, 0.7, num_groups=2),
             _run(tmp_path, "gn1", "gn", 1, float("nan"), status="diverged", num_groups=2)]
    (tmp_path / "unfinished").mkdir()
    result = CliRunner().invoke(main, ["summarize", *map(str, dirs), str(tmp_path / "unfinished")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("7 runs") and "| test acc (old per-norm protocol) |" in result.output
    std, old_std = statistics.stdev([0.80, 0.82, 0.84]), statistics.stdev([0.60, 0.70])
    # columns: n, running, precise, old protocol, train acc, train loss, images/s, diverged
    assert sorted(_rows(result.output)) == [
        ("bn", ["2", "–", "–", f"0.6500 ± {old_std:.4f}", f"0.6600 ± {old_std:.4f}", "0.3000 ± 0.0000",
                "1,000", "0"]),  # the old runs: a row of their own, nothing in the new columns
        ("bn", ["3", f"0.7700 ± {std:.4f}", f"0.8200 ± {std:.4f}", "–", f"0.8300 ± {std:.4f}",
                "0.3000 ± 0.0000", "1,000", "0"]),
        ("gn (num_groups=2)", ["1", "0.6500", "0.7000", "–", "0.7100", "0.3000", "1,000", "1"]),
    ]


def test_summarize_names_the_settings_that_differ(tmp_path):
    dirs = [_run(tmp_path, "a", "bn", 0, 0.8, lr=0.1), _run(tmp_path, "b", "bn", 0, 0.7, lr=0.5)]
    result = CliRunner().invoke(main, ["summarize", *map(str, dirs)])
    assert [label for label, _ in _rows(result.output)] == ["bn [lr=0.1]", "bn [lr=0.5]"]


def test_summarize_without_finished_runs_is_an_error(tmp_path):
    result = CliRunner().invoke(main, ["summarize", str(tmp_path)])
    assert result.exit_code == 1 and "no finished run" in result.output
