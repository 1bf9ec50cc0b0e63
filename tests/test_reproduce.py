"""`afmp reproduce`: every shipped study end to end on small CIFAR-format files written here.

The data is learnable (a class is a brightness level), so the runs' accuracies differ and
the report can be checked against the runs' own results.json files.
"""

import csv
import json
import math
import pickle
import re
import statistics

import numpy as np
import pytest

import afmp_cli as cli
from afmp.studies import ablate, reproduce
from afmp.training.rundir import run_labels

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(labels, rng):
    # Class c is a mid-grey of level c plus noise: a few steps of training separate them.
    base = np.array(labels, dtype=np.int64)[:, None] * 50 + 30
    return np.clip(base + rng.integers(-20, 21, size=(len(labels), 3072)), 0, 255).astype(np.uint8)


def _dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    c100 = root / "cifar-100-python"
    c100.mkdir()
    train, test = [i % 4 for i in range(40)], [i % 4 for i in range(12)]
    _dump(c100 / "train", {"data": _images(train, rng), "fine_labels": train, "coarse_labels": [0] * 40})
    _dump(c100 / "test", {"data": _images(test, rng), "fine_labels": test, "coarse_labels": [0] * 12})
    _dump(c100 / "meta", {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["c"]})
    c10 = root / "cifar-10-batches-py"
    c10.mkdir()
    for b in range(1, 6):
        labels = [(b + i) % 4 for i in range(8)]
        _dump(c10 / f"data_batch_{b}", {"data": _images(labels, rng), "labels": labels})
    _dump(c10 / "test_batch", {"data": _images(test, rng), "labels": test})
    _dump(c10 / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return root


def _run(study, data_dir, out, *extra):
    argv = ["reproduce", study, "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu"]
    return cli.main([*argv, "--set", "train.batch_size=8", *extra])


def _results(path):
    return json.loads((path / "results.json").read_text())


def test_help_and_no_study_list_every_shipped_study(capsys):
    names = sorted(p.stem for p in reproduce.STUDY_DIR.glob("*.yaml"))
    assert names == [
        "ablation-lambda",
        "ablation-sparsity",
        "ablation-topdown",
        "mnist5k-lambda",
        "mnist5k-pareto",
        "mnist5k-sparsity",
        "mnist5k-superpixels",
        "mnist5k-topdown",
        "pareto",
        "scaling",
    ]
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--help"])
    printed = capsys.readouterr().out
    assert all(re.search(rf"^  {n} +\S", printed, re.M) for n in names)
    assert cli.main(["reproduce"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == names


def test_the_cifar100_ablations_are_the_notebooks_recipe():
    for name in ("ablation-sparsity", "ablation-lambda", "ablation-topdown"):
        train = reproduce.load_study(name)["train"]
        assert train == {
            "model": "afmp_tiny",
            "dataset": "cifar100",
            "epochs": 100,
            "batch_size": 128,
            "lr": 0.001,
            "weight_decay": 0.0001,
            "scheduler": "plateau",
            "label_smoothing": 0.0,
            "clip_grad": 0.0,
            "warmup_epochs": 0.0,
        }, name


def test_topdown_study_end_to_end_report_holds_the_runs_numbers(data_dir, tmp_path, capsys):
    out = tmp_path / "td"
    assert _run("ablation-topdown", data_dir, out, "--seeds", "2", "--epochs", "2") == 0
    test = {
        (s, k): _results(out / s / f"seed{k}")["test_accuracy"]
        for s in ("topdown", "no_topdown")
        for k in (0, 1)
    }
    for s in ("topdown", "no_topdown"):
        assert _results(out / s / "seed0")["config"]["scheduler"] == "plateau"
    report = (out / "report.md").read_text()
    assert "**Claim tested:** the top-down refinement pass gives a significant accuracy gain" in report
    means = {s: statistics.fmean([test[s, 0], test[s, 1]]) for s in ("topdown", "no_topdown")}
    stds = {s: statistics.stdev([test[s, 0], test[s, 1]]) for s in ("topdown", "no_topdown")}
    assert "| Top-down | 2 | " in report and f"| {means['topdown']:.2f} ± {stds['topdown']:.2f} |" in report
    diffs = [test["no_topdown", k] - test["topdown", k] for k in (0, 1)]
    assert (
        f"| {means['no_topdown']:.2f} ± {stds['no_topdown']:.2f} | {statistics.fmean(diffs):+.2f} ±" in report
    )
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "study.json").read_text())["config"]["seeds"] == 2
    capsys.readouterr()
    # Run again: it continues (nothing is retrained) and writes the same report.
    before = (out / "topdown" / "seed0" / "results.json").stat().st_mtime_ns
    assert _run("ablation-topdown", data_dir, out, "--seeds", "2", "--epochs", "2") == 0
    assert capsys.readouterr().out.count("done already, kept") == 4
    assert (out / "topdown" / "seed0" / "results.json").stat().st_mtime_ns == before
    assert (out / "report.md").read_text() == report


@pytest.mark.parametrize("study, settings", [
    ("ablation-sparsity", ["dense", "rho0.2", "rho0.3", "rho0.4", "rho0.5", "rho0.6"]),
    ("ablation-lambda", ["lambda1e-3", "lambda1e-4", "lambda1e-5"]),
])  # fmt: skip
def test_sparsity_and_lambda_studies_end_to_end(study, settings, data_dir, tmp_path):
    out = tmp_path / study
    assert _run(study, data_dir, out, "--seeds", "1", "--epochs", "1") == 0
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == settings
    report = (out / "report.md").read_text()
    for row, setting in zip(rows, settings):
        results = _results(out / setting / "seed0")
        assert results["config"]["model_opts"]["use_top_down"] is False  # the paper's text
        assert float(row["test_mean"]) == results["test_accuracy"]
        assert f"| {results['test_accuracy']:.2f} ± nan |" in report
    assert report.count("one seed, no spread: no conclusion can be drawn") == len(settings) - 1


def test_pareto_study_end_to_end(data_dir, tmp_path):
    out = tmp_path / "pareto"
    family = (
        "models=[{label: afmp_tiny, model: afmp_tiny}, {label: deit_tiny, model: vit_baseline_tiny,"
        " model_opts: {depth: 2}}, {label: resnet10t, model: convnet_resnet10t}]"
    )
    sets = ["--set", family, "--set", "bench.warmup=0", "--set", "bench.repeats=1"]
    assert _run("pareto", data_dir, out, "--seeds", "2", "--epochs", "1", *sets) == 0
    with open(out / "pareto.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["afmp_tiny", "deit_tiny", "resnet10t"]
    report = (out / "report.md").read_text()
    for label, row in rows.items():
        accs = [_results(out / label / f"seed{k}")["test_accuracy"] for k in (0, 1)]
        assert _results(out / label / "seed0")["dataset"] == "cifar10"
        assert float(row["accuracy"]) == pytest.approx(statistics.fmean(accs))
        assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(accs))
        assert row["seeds"] == "2" and float(row["ms_b1"]) > 0 and float(row["ms_b64"]) > 0
        assert (
            f"| {label} | " in report
            and f"| {statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f} (2) |" in report
        )
    assert rows["resnet10t"]["model"] == "convnet_resnet10t"
    # Each model against the first, seed by seed: the differences of the runs' own accuracies.
    first = [_results(out / "afmp_tiny" / f"seed{k}")["test_accuracy"] for k in (0, 1)]
    for label in ("deit_tiny", "resnet10t"):
        diffs = [_results(out / label / f"seed{k}")["test_accuracy"] - first[k] for k in (0, 1)]
        row = rows[label]
        assert float(row["test_diff_mean"]) == pytest.approx(statistics.fmean(diffs))
        assert int(row["test_ahead"]) == sum(d > 0 for d in diffs) and row["test_pairs"] == "2"
        ahead = f"{sum(d > 0 for d in diffs)}/2"
        assert f"| {statistics.fmean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} | {ahead} |" in report
    assert "## Test accuracy against afmp_tiny, seed by seed" in report
    assert "- Against FLOPs: frontier " in report
    # The verdict follows the frontiers listed: the claim needs AFMP on the FLOPs one only.
    flops_line = next(line for line in report.splitlines() if line.startswith("- Against FLOPs"))
    latency_lines = [line for line in report.splitlines() if line.startswith("- Against latency")]
    consistent = "AFMP on it" in flops_line and not any("AFMP on it" in line for line in latency_lines)
    assert ("Verdict: consistent with the claim" in report) == consistent and "Verdict: " in report
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_scaling_study_end_to_end(tmp_path):
    out = tmp_path / "scaling"
    sets = [
        "bench.models=[afmp_tiny, deit_tiny_sdpa]",
        "bench.resolutions=[32, 64]",
        "bench.batch_size=2",
        "bench.dtype=float32",  # the config's bf16 would calibrate a bf16 matmul on the CPU first
        "bench.warmup=0",
        "bench.repeats=1",
    ]
    argv = ["reproduce", "scaling", "--out", str(out), "--device", "cpu"]
    assert cli.main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0
    with open(out / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["resolution"]) for r in rows] == [
        ("afmp_tiny", "32"), ("deit_tiny_sdpa", "32"), ("afmp_tiny", "64"), ("deit_tiny_sdpa", "64"),
    ]  # fmt: skip
    report = (out / "report.md").read_text()
    for model in ("afmp_tiny", "deit_tiny_sdpa"):
        mine = [r for r in rows if r["model"] == model]
        tokens = [float(r["tokens"]) for r in mine]
        a = math.log(float(mine[1]["ms_median"]) / float(mine[0]["ms_median"])) / math.log(
            tokens[1] / tokens[0]
        )
        assert f"| {model} | 2 | — | {a:.2f} |" in report
    assert (out / "time_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"


def test_dry_run_lists_the_runs_and_their_measured_cost(capsys):
    argv = ["reproduce", "ablation-topdown", "--dry-run", "--device", "cpu", "--tflops", "100"]
    assert cli.main([*argv, "--set", "train.batch_size=16"]) == 0
    printed = capsys.readouterr().out
    assert "ablation-topdown: 6 training runs (3 seed(s))" in printed
    rows = [
        line.split("|")[1:-1]
        for line in printed.splitlines()
        if line.startswith("| top") or line.startswith("| no_")
    ]
    assert [r[0].strip() for r in rows] == ["topdown", "no_topdown"]
    for r in rows:
        runs, epochs, steps = (int(r[i]) for i in (1, 2, 3))
        assert (runs, epochs, steps) == (3, 100, 2813)  # 45,000 training images / 16, rounded up
        ms, gflops, hours, at_rate = float(r[6]), float(r[5]), float(r[8]), float(r[9])
        # hours = runs x epochs x steps (+ a third of a step per validation image) x time per step
        assert hours == pytest.approx(3 * 100 * 2813 * (1 + 1 / 27) * ms / 3.6e6, rel=0.02)
        assert at_rate == pytest.approx(
            3 * 100 * 2813 * (1 + 1 / 27) * gflops / 1e5 / 3600, rel=0.05, abs=6e-4
        )
    assert cli.main(["reproduce", "scaling", "--dry-run"]) == 0
    assert "6 models x 6 sizes = 36 cells" in capsys.readouterr().out


def test_bad_input_is_one_line(capsys, tmp_path):
    assert cli.main(["reproduce", "ablation-nothing", "--out", str(tmp_path / "x")]) == 2
    assert "unknown study 'ablation-nothing'; choose one of: ablation-lambda" in capsys.readouterr().err
    assert cli.main(["reproduce", "ablation-topdown", "--set", "seeds", "--out", str(tmp_path / "x")]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["reproduce", "ablation-topdown", "--seeds", "0", "--out", str(tmp_path / "x")]) == 2
    assert "seeds must be an integer >= 1, got 0" in capsys.readouterr().err
    assert (
        cli.main(["reproduce", "ablation-topdown", "--set", "train.epocs=3", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "unknown train setting(s) epocs" in capsys.readouterr().err
    assert (
        cli.main(["reproduce", "ablation-topdown", "--set", "train.lr=-1", "--out", str(tmp_path / "x")]) == 2
    )
    assert "lr must be a number >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written


def test_run_labels_tell_runs_apart(tmp_path):
    for folder, seed in (("a/seed0", 0), ("b/seed0", 0), ("c", 1)):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "results.json").write_text(
            json.dumps({"model": "afmp_tiny", "dataset": "digits", "config": {"seed": seed}})
        )
    (tmp_path / "d").mkdir()
    runs = [tmp_path / "a/seed0", tmp_path / "b/seed0", tmp_path / "c", tmp_path / "d"]
    assert run_labels(runs) == [
        f"afmp_tiny-digits-seed0 ({tmp_path / 'a/seed0'})",
        f"afmp_tiny-digits-seed0 ({tmp_path / 'b/seed0'})",
        "afmp_tiny-digits-seed1",
        "d",
    ]


@pytest.mark.parametrize("name", sorted(p.stem for p in reproduce.STUDY_DIR.glob("*.yaml")))
def test_every_shipped_study_plans_valid_runs(name, tmp_path):
    # What `afmp reproduce NAME` would train passes afmp train's checks (models, options, data
    # set names) before anything runs; the end-to-end tests above run the CIFAR ones for real.
    from argparse import Namespace

    from afmp.training import config as trainer

    study = reproduce.load_study(name)
    assert study["claim"] and study["kind"] in reproduce.KINDS
    runs = reproduce.planned_runs(study, Namespace(data_dir=None, device=None, download=None), tmp_path)
    if study["kind"] == "scaling":
        assert runs == [] and study["bench"]["models"]
        return
    settings = len(study["models"]) if study["kind"] == "pareto" else len(ablate.STUDIES[study["study"]])
    expected = study["seeds"] * settings
    assert len(runs) == expected
    for _, _, cfg in runs:
        trainer.check_config(cfg)
    assert not any(tmp_path.iterdir())  # checking writes nothing


def test_jobs_reach_the_trainer_of_every_kind_of_study(data_dir, tmp_path, monkeypatch, capsys):
    # ablate.train_runs trains the runs N at a time (tests/test_ablate.py checks that their
    # numbers are a serial study's); here: both kinds of study that train hand it --jobs.
    class Trained(Exception):
        pass

    seen = []

    def train_runs(runs, *, resume, jobs=1):
        seen.append((runs[0][0], jobs))
        raise Trained

    monkeypatch.setattr(ablate, "train_runs", train_runs)
    for study in ("ablation-topdown", "pareto"):
        with pytest.raises(Trained):
            _run(study, data_dir, tmp_path / study, "--jobs", "2", "--epochs", "1")
    assert seen == [("topdown", 2), ("afmp_tiny", 2)]
    assert _run("ablation-topdown", data_dir, tmp_path / "bad", "--jobs", "0") == 2
    assert "--jobs must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
