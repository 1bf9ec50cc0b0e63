"""`afmp reproduce mnist5k-superpixels`: the point-set study end to end on 20 digits written
here (tests/test_superpixels.py's), and its --dry-run's costs for point-set data."""

import csv
import json
import statistics
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import afmp
import afmp_cli as cli
from afmp.studies import cost, reproduce
from afmp.training.config import TrainConfig
from test_mnist5k import csv_lines, write_csv
from test_superpixels import digit_rows

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = ["afmp_points_dense", "afmp_points", "graph_gcn", "graph_gat", "graph_gatedgcn", "afmp_tiny_grid"]


@pytest.fixture
def digits(tmp_path, fast_calibration):
    """20 digits in mnist_5k.csv.gz's format, a private cache, and a roofline calibrated in ms."""
    return write_csv(tmp_path / "digits.csv.gz", csv_lines(digit_rows()))


def _results(path):
    return json.loads((path / "results.json").read_text())


def test_the_study_is_the_stated_recipe_with_the_dense_model_first():
    study = reproduce.load_study("mnist5k-superpixels")
    assert [m["label"] for m in study["models"]] == LABELS
    assert study["models"][0]["model_opts"] == {"sparsity": 0.0, "lambda_sparse": 0.0}
    assert (study["seeds"], study["verdict"]) == (5, "paired")
    runs = reproduce.planned_runs(study, Namespace(data_dir=None, device=None, download=None), Path("runs"))
    assert len(runs) == 30 and [label for label, _, _ in runs[:6]] == LABELS
    recipe = {"epochs": 12, "batch_size": 64, "lr": 0.003, "weight_decay": 0.05, "scheduler": "cosine"}
    recipe |= {"warmup_epochs": 2.0, "label_smoothing": 0.1, "clip_grad": 1.0, "select": "last"}
    for label, seed, cfg in runs:
        assert {k: getattr(cfg, k) for k in recipe} == recipe, label
        # Only the grid's reference point has a data set of its own: the same digits as patches.
        assert cfg.dataset == ("mnist5k" if label == "afmp_tiny_grid" else "mnist5k-superpixels")
        assert cfg.out == f"runs/{label}/seed{seed}"


def test_the_study_end_to_end_pairs_every_model_with_dense_afmp(digits, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["reproduce", "mnist5k-superpixels", "--out", str(out), "--device", "cpu", "--seeds", "2"]
    sets = ["train.epochs=1", "train.batch_size=8", f"train.data_opts={{path: {digits}}}"]
    sets += ["bench.warmup=0", "bench.repeats=1"]
    assert cli.main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0
    with open(out / "pareto.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(rows) == LABELS
    report = (out / "report.md").read_text()
    accuracy = {
        label: [_results(out / label / f"seed{k}")["test_accuracy"] for k in (0, 1)] for label in LABELS
    }
    for label, row in rows.items():
        results = _results(out / label / "seed0")
        assert results["dataset"] == ("mnist5k" if label == "afmp_tiny_grid" else "mnist5k-superpixels")
        assert float(row["accuracy"]) == pytest.approx(statistics.fmean(accuracy[label]))
        assert (
            float(row["ms_b1"]) > 0 and float(row["ms_b64"]) > 0 and int(row["params"]) == results["params"]
        )
        if label == "afmp_tiny_grid":  # the 7x7 patch grid of the 28x28 digits
            assert (row["resolution"], row["tokens"]) == ("28", "49")
        else:  # a point-set model is measured at its data's largest set
            largest = str(results["data"]["tokens_min_mean_max"][2])
            assert (row["resolution"], row["tokens"]) == (largest, largest)
        if label != LABELS[0]:  # seed by seed against dense AFMP
            diffs = [a - b for a, b in zip(accuracy[label], accuracy[LABELS[0]])]
            assert float(row["test_diff_mean"]) == pytest.approx(statistics.fmean(diffs))
            assert row["test_pairs"] == "2" and int(row["test_ahead"]) == sum(d > 0 for d in diffs)
    assert (
        "Verdict: the claim is a paired comparison: see the differences against afmp_points_dense" in report
    )
    assert "consistent with the claim" not in report and "not supported here" not in report
    assert "## Test accuracy against afmp_points_dense, seed by seed" in report
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_the_dry_run_builds_point_set_models_for_the_data_sets_shape(monkeypatch):
    # A 3-D point-set data set of 5 features and 4 classes: the model dry-run measures is
    # built for it, not for an image's channels or the preset's 2-D positions.
    monkeypatch.setitem(cost.DATA_SHAPES, "sets-3d", (100, 20, 5, 4))
    monkeypatch.setitem(cost.POINT_SETS, "sets-3d", 3)
    cfg = TrainConfig(model="afmp_points", dataset="sets-3d", batch_size=2, model_opts={"d_model": 16})
    measured = cost.step_cost(cfg, torch.device("cpu"))
    model = afmp.create_model("afmp_points", in_features=5, pos_dim=3, num_classes=4, d_model=16)
    assert measured["params"] == sum(p.numel() for p in model.parameters())
    assert measured["ms"] > 0 and measured["gflops"] > 0


def test_the_real_studys_dry_run_lists_its_six_models(capsys):
    argv = ["reproduce", "mnist5k-superpixels", "--dry-run", "--device", "cpu", "--set", "train.batch_size=4"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "mnist5k-superpixels: 30 training runs (5 seed(s))" in printed
    table = [
        line.split("|")[1:-1] for line in printed.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert [r[0].strip() for r in table[1:]] == LABELS
    # 4,000 sets less the 10% held out, 4 a batch: 900 steps an epoch, 12 epochs, 5 runs each.
    assert all((r[1].strip(), r[2].strip(), r[3].strip()) == ("5", "12", "900") for r in table[1:])


def test_the_dry_run_prices_a_model_on_two_data_sets_as_two_rows(capsys):
    models = "models=[{label: grid28, model: afmp_tiny, dataset: mnist5k}, {label: grid8, model: afmp_tiny, dataset: digits}]"
    argv = ["reproduce", "mnist5k-superpixels", "--dry-run", "--device", "cpu", "--seeds", "1"]
    assert cli.main([*argv, "--set", "train.batch_size=4", "--set", models]) == 0
    rows = [
        line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| grid")
    ]
    # 3,600 and 1,455 training images, 4 a batch: each data set's own steps.
    assert [(r[0].strip(), r[3].strip()) for r in rows] == [("grid28", "900"), ("grid8", "364")]


def test_a_bad_verdict_is_one_line_and_writes_nothing(tmp_path, capsys):
    argv = ["reproduce", "mnist5k-superpixels", "--out", str(tmp_path / "x"), "--set", "verdict=frontier"]
    argv += ["--dry-run", "--set", "train.batch_size=2"]  # were it not caught: a cheap dry run, not a study
    assert cli.main(argv) == 2
    assert (
        "mnist5k-superpixels: verdict must be one of frontiers, paired, got 'frontier'"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "x").exists()


def test_the_pareto_plot_names_its_inputs_by_the_models_data():
    from afmp.bench import pareto

    def unit(*models):
        return pareto.panels([{"model": m} for m in models])[0][1]

    assert unit("afmp_points", "graph_gat") == "GFLOP per set (matmul)"
    assert unit("afmp_tiny") == "GFLOP per image (matmul)"
    assert unit("diffusion_text") == "GFLOP per sequence (matmul)"
    assert unit("afmp_points", "afmp_tiny") == "GFLOP per input (matmul)"
