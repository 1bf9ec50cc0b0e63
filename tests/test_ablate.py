"""`afmp ablate`: the studies' settings, the summary over seeds, and continuing a stopped study."""

import csv
import json
import math
import os
import statistics

import pytest
import yaml

import afmp_cli as cli
from afmp.studies import ablate
from afmp.training.config import TrainConfig

TINY = ["-o", "d_model=16", "-o", "num_layers=2", "-o", "k_dim=8", "-o", "score_hidden=8"]


def _args(study, out, *extra):
    return ["ablate", study, "--dataset", "digits", "--batch-size", "128", "--out", str(out), *TINY, *extra]


def test_study_settings():
    assert ablate.STUDIES["sparsity"] == [
        ("dense", "Dense", {"sparsity": 0.0, "lambda_sparse": 0.0}),
        *[(f"rho{r}", f"ρ={r}", {"sparsity": r, "lambda_sparse": 1e-4}) for r in (0.2, 0.3, 0.4, 0.5, 0.6)],
    ]
    assert ablate.STUDIES["lambda"] == [
        ("lambda1e-3", "λ=1e-3", {"sparsity": 0.3, "lambda_sparse": 1e-3}),
        ("lambda1e-4", "λ=1e-4", {"sparsity": 0.3, "lambda_sparse": 1e-4}),
        ("lambda1e-5", "λ=1e-5", {"sparsity": 0.3, "lambda_sparse": 1e-5}),
    ]
    assert ablate.STUDIES["topdown"] == [
        ("topdown", "Top-down", {"sparsity": 0.3, "lambda_sparse": 1e-4, "use_top_down": True}),
        ("no_topdown", "No top-down", {"sparsity": 0.3, "lambda_sparse": 1e-4, "use_top_down": False}),
    ]
    # The paper's text leaves top-down out of the first two studies; -o use_top_down=true puts it in.
    assert ablate.STUDY_DEFAULTS == {"sparsity": {"use_top_down": False}, "lambda": {"use_top_down": False}}


def test_paired_comparison_by_seed():
    # Seeds 0..3 in common (seed 7 has no partner); differences +2, -1, +5 and a tie, 0.
    got = ablate.paired({0: 90.0, 1: 91.0, 2: 89.0, 3: 80.0, 7: 50.0}, {2: 94.0, 1: 90.0, 0: 92.0, 3: 80.0})
    assert got["pairs"] == 4 and got["ahead"] == 2  # a tie is not ahead
    assert got["diff_mean"] == pytest.approx(1.5) and got["diff_std"] == pytest.approx(7**0.5)
    # t = 1.5 / (sqrt(7) / 2) = 1.1339 on 3 degrees of freedom: two-sided p = 0.3393.
    assert got["p_value"] == pytest.approx(0.33925, abs=1e-4)
    assert ablate.paired({0: 1.0}, {1: 2.0})["pairs"] == 0
    assert math.isnan(ablate.paired({0: 1.0}, {0: 2.0})["p_value"])  # one pair: no spread


def test_paired_with_two_pairs_no_pairs_and_no_spread():
    """Two differences, 0.5 and 1.0, both ahead although under 1: mean 0.75, sample std
    sqrt(0.125); t = 0.75 / (sqrt(0.125) / sqrt(2)) = 3 on 1 degree of freedom (Cauchy), so
    p = 1 - (2 / pi) atan(3) = 0.204833."""
    got = ablate.paired({0: 90.0, 1: 80.0}, {0: 90.5, 1: 81.0})
    assert (got["pairs"], got["ahead"]) == (2, 2)
    assert got["diff_mean"] == pytest.approx(0.75) and got["diff_std"] == pytest.approx(0.125**0.5)
    assert got["p_value"] == pytest.approx(1 - 2 / math.pi * math.atan(3), abs=1e-9)
    same = ablate.paired({0: 90.0, 1: 80.0}, {0: 91.0, 1: 81.0})  # +1, +1: no spread, no test
    assert same["diff_std"] == 0.0 and math.isnan(same["p_value"])
    none = ablate.paired({0: 1.0}, {1: 2.0})
    assert sorted(none) == ["ahead", "diff_mean", "diff_std", "p_value", "pairs"]
    assert (none["pairs"], none["ahead"]) == (0, 0)
    assert all(math.isnan(none[k]) for k in ("diff_mean", "diff_std", "p_value"))


def test_run_configs(tmp_path):
    base = TrainConfig(out=str(tmp_path), seed=5, lr=3e-3, model_opts={"d_model": 16})
    runs = ablate.run_configs("sparsity", base, seeds=2)
    assert [(s, k) for s, k, _ in runs[:7]] == [(s, 5) for s, _, _ in ablate.STUDIES["sparsity"]] + [
        ("dense", 6)
    ]
    setting, seed, cfg = runs[1]
    assert cfg.out == str(tmp_path / "rho0.2" / "seed5") and cfg.lr == 3e-3
    assert cfg.model_opts == {"d_model": 16, "sparsity": 0.2, "lambda_sparse": 1e-4, "use_top_down": False}
    with_td = ablate.run_configs("lambda", TrainConfig(model_opts={"use_top_down": True}), seeds=1)
    assert [c.model_opts["use_top_down"] for _, _, c in with_td] == [True] * 3
    with pytest.raises(ValueError, match="sets use_top_down itself"):
        ablate.run_configs("topdown", TrainConfig(model_opts={"use_top_down": True}), seeds=1)
    with pytest.raises(ValueError, match="sets sparsity itself"):
        ablate.run_configs("topdown", TrainConfig(model_opts={"sparsity": 0.1}), seeds=1)
    with pytest.raises(ValueError, match="at least 1"):
        ablate.run_configs("topdown", base, seeds=0)


def test_topdown_study_end_to_end_and_continue(tmp_path, capsys):
    out = tmp_path / "abl"
    assert cli.main(_args("topdown", out, "--epochs", "2", "--seeds", "2")) == 0
    results = {
        (s, k): json.loads((out / s / f"seed{k}" / "results.json").read_text())
        for s in ("topdown", "no_topdown")
        for k in (0, 1)
    }
    assert results["topdown", 1]["config"]["model_opts"]["use_top_down"] is True
    assert results["no_topdown", 0]["config"]["seed"] == 0 and results["no_topdown", 1]["config"]["seed"] == 1
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == ["topdown", "no_topdown"]
    for row in rows:
        vals = [results[row["setting"], k]["best_val_accuracy"] for k in (0, 1)]
        tests = [results[row["setting"], k]["test_accuracy"] for k in (0, 1)]
        times = [t for k in (0, 1) for t in results[row["setting"], k]["training_history"]["time"]]
        assert row["seeds"] == "2"
        assert float(row["best_val_mean"]) == pytest.approx(statistics.fmean(vals))
        assert float(row["best_val_std"]) == pytest.approx(statistics.stdev(vals))
        assert float(row["test_mean"]) == pytest.approx(statistics.fmean(tests))
        assert float(row["test_std"]) == pytest.approx(statistics.stdev(tests))
        assert float(row["epoch_time_s"]) == pytest.approx(statistics.fmean(times))
        diffs = [tests[k] - results["topdown", k]["test_accuracy"] for k in (0, 1)]
        assert row["vs"] == "topdown" and float(row["test_diff_mean"]) == pytest.approx(
            statistics.fmean(diffs)
        )
        assert row["test_ahead"] == str(sum(d > 0 for d in diffs))
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()

    # Run again: finished runs are kept, not retrained.
    kept = out / "topdown" / "seed0" / "results.json"
    before = kept.stat().st_mtime_ns
    assert cli.main(_args("topdown", out, "--epochs", "2", "--seeds", "2")) == 0
    assert kept.stat().st_mtime_ns == before
    assert capsys.readouterr().out.count("done already, kept") == 4

    # An interrupted run (no results.json yet) continues from its last epoch with --resume.
    (out / "no_topdown" / "seed1" / "results.json").unlink()
    assert cli.main(_args("topdown", out, "--epochs", "2", "--seeds", "2", "--resume")) == 0
    printed = capsys.readouterr().out
    assert printed.count("done already, kept") == 3 and "at epoch 3" in printed  # nothing left to train
    again = json.loads((out / "no_topdown" / "seed1" / "results.json").read_text())
    assert again["training_history"] == results["no_topdown", 1]["training_history"]

    # The same --out with other settings is refused rather than mixed in.
    assert cli.main(_args("topdown", out, "--epochs", "3", "--seeds", "2")) == 2
    assert "trained with other settings (epochs: 2 there, 3 now)" in capsys.readouterr().err


def test_lambda_study_one_seed(tmp_path):
    out = tmp_path / "lam"
    assert cli.main(_args("lambda", out, "--epochs", "1", "--seeds", "1")) == 0
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == ["lambda1e-3", "lambda1e-4", "lambda1e-5"]
    assert all(r["best_val_std"] == "nan" for r in rows)  # one seed: no spread to report
    assert (out / "comparison.png").is_file()


def _history(run):
    """history.csv's columns that the computation fixes (time, images/s and MFU are the machine's)."""
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: r[k] for k in ("epoch", "train_loss", "train_acc", "val_acc", "sparsity_loss")} for r in rows]


def test_jobs_train_the_runs_at_once_with_the_numbers_of_a_serial_study(tmp_path):
    # The serial study with each run's share of the cores as its --threads: the thread count
    # alone moves the last digits (torch's CPU reductions split their sums by thread).
    share = str(max(1, os.cpu_count() // 2))
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    for out, extra in ((serial, ("--jobs", "1", "--threads", share)), (parallel, ("--jobs", "2"))):
        assert cli.main(_args("topdown", out, "--epochs", "2", "--seeds", "1", *extra)) == 0
    spans = []
    for setting in ("topdown", "no_topdown"):
        one, two = serial / setting / "seed0", parallel / setting / "seed0"
        assert _history(two) == _history(one) and len(_history(one)) == 2
        assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
        # Each worker trained with its share of the cores, and said so in the run's config.
        config = yaml.safe_load((two / "config.yaml").read_text())
        assert config["threads"] == config["machine"]["threads"] == max(1, os.cpu_count() // 2)
        spans.append(((two / "config.yaml").stat().st_mtime, (two / "results.json").stat().st_mtime))
    # At once: each run started (config.yaml) before the other finished (results.json).
    (start_a, end_a), (start_b, end_b) = spans
    assert start_a < end_b and start_b < end_a, spans
    with open(serial / "summary.csv") as f, open(parallel / "summary.csv") as g:
        keep = ("setting", "best_val_mean", "test_mean", "test_diff_mean")
        assert [[r[k] for k in keep] for r in csv.DictReader(f)] == [
            [r[k] for k in keep] for r in csv.DictReader(g)
        ]


def test_jobs_must_be_a_positive_integer(tmp_path, capsys):
    assert cli.main(_args("topdown", tmp_path / "x", "--jobs", "0")) == 2
    assert "--jobs must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_each_of_n_jobs_gets_its_share_of_the_cores_and_at_least_one_thread():
    from afmp.utils.parallel import threads_per_job

    assert threads_per_job(2, cores=16) == 8
    assert threads_per_job(3, cores=8) == 2  # rounded down: N jobs never ask for more than the cores
    assert threads_per_job(4, cores=2) == 1
