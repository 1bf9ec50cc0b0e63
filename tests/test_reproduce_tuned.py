"""`afmp reproduce STUDY --tuned`: every model searched with the same budget, then its seeds
at its best recipe; the plan, its cost, and a tiny study end to end."""

import csv
import json
import math
import re
from argparse import Namespace

import pytest

import afmp_cli as cli
from afmp.studies import cost, reproduce, tuned
from afmp.utils.errors import UsageError
from afmp.utils.files import write_csv

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("optuna")

DIGITS = ["train.dataset=digits"]  # the plan's checks build the data: digits ships with scikit-learn


def _args(**kw):
    return Namespace(data_dir=None, device=None, download=None, jobs=1, tflops=None, **kw)


def test_every_model_is_searched_with_the_same_budget_and_nothing_is_written(tmp_path):
    study = reproduce.load_study("mnist5k-pareto", DIGITS)
    trials, max_epochs = tuned.budget("mnist5k-pareto", study)
    assert (trials, max_epochs) == (study["tuned"]["trials"], study["tuned"]["max_epochs"])
    found = tuned.searches("mnist5k-pareto", study, _args(), tmp_path)
    assert [s.study_name for s in found] == [e["label"] for e in study["models"]]
    for search, entry in zip(found, study["models"]):
        assert search.trials == trials and search.base.model == entry["model"]
        assert search.base.model_opts == entry.get("model_opts", {})
        assert search.base.batch_size == study["train"]["batch_size"] and search.base.dataset == "digits"
        assert max(search.space["epochs"].edges()) <= max_epochs
        assert search.out == str(tmp_path / "search" / entry["label"])
    vit = found[[e["label"] for e in study["models"]].index("vit_baseline")]
    assert "model_opts.drop_path_rate" in vit.space
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_the_seeds_train_each_models_best_recipe(tmp_path):
    study = reproduce.load_study("mnist5k-pareto", [*DIGITS, "seeds=2"])
    found = tuned.searches("mnist5k-pareto", study, _args(), tmp_path)[:2]
    best = {
        found[0].study_name: {"params": {"lr": 0.01, "epochs": 8, "data_opts.shift": 0}},
        found[1].study_name: {"params": {"lr": 0.002, "epochs": 12, "data_opts.shift": 3}},
    }
    runs = tuned.final_runs(study, found, best, tmp_path)
    assert [(label, seed) for label, seed, _ in runs] == [
        (found[0].study_name, 0), (found[1].study_name, 0), (found[0].study_name, 1), (found[1].study_name, 1),
    ]  # fmt: skip
    for label, seed, cfg in runs:
        params = best[label]["params"]
        assert (cfg.lr, cfg.epochs, cfg.data_opts["shift"], cfg.seed) == (
            params["lr"], params["epochs"], params["data_opts.shift"], seed,
        )  # fmt: skip
        assert cfg.out == str(tmp_path / label / f"seed{seed}")


def test_dry_run_prints_the_plan_and_an_upper_bound_of_its_cost(monkeypatch, capsys):
    step_ms = {
        "afmp_tiny": 10_000.0,
        "vit_baseline_tiny": 40_000.0,
    }  # ms per step, stood in for the measurement

    def step_cost(cfg, device):
        return {"ms": step_ms.get(cfg.model, 20_000.0), "peak_mb": 1.0, "gflops": 1.0, "params": 1000}

    monkeypatch.setattr(cost, "step_cost", step_cost)
    argv = ["reproduce", "mnist5k-pareto", "--tuned", "--dry-run", "--device", "cpu", "--jobs", "2"]
    assert (
        cli.main([*argv, "--set", DIGITS[0], "--set", "tuned.trials=3", "--set", "tuned.max_epochs=4"]) == 0
    )
    printed = capsys.readouterr().out
    study = reproduce.load_study("mnist5k-pareto")
    assert f"for each of {len(study['models'])} models, a search of 3 trials of at most 4 epochs" in printed
    rows = {
        line.split("|")[1].strip(): line.split("|")[1:-1]
        for line in printed.splitlines()
        if line.startswith("| ")
    }
    images, side, _, _ = cost.DATA_SHAPES["digits"]
    steps = math.ceil(images * 0.9 / study["train"]["batch_size"])
    for entry in study["models"]:
        runs, epochs, per_run, ms, hours = (rows[entry["label"]][i].strip() for i in (1, 2, 3, 6, 8))
        # Every trial and every seed, unpruned, at the most epochs.
        assert (int(runs), int(epochs), int(per_run)) == (3 + study["seeds"], 4, steps)
        expected = (
            (3 + study["seeds"])
            * 4
            * steps
            * (1 + 0.1 / 0.9 / 3)
            * step_ms.get(entry["model"], 20_000.0)
            / 3.6e6
        )
        assert float(ms) == step_ms.get(entry["model"], 20_000.0) and float(hours) == pytest.approx(
            expected, abs=0.006
        )
    assert "with --jobs 2: about that divided by 2 at best" in printed


def test_tuned_is_refused_for_a_study_without_a_budget(tmp_path, capsys):
    out = tmp_path / "x"
    assert cli.main(["reproduce", "mnist5k-topdown", "--tuned", "--out", str(out)]) == 2
    assert (
        "--tuned needs a pareto study with a tuned: section (mnist5k-pareto); mnist5k-topdown has none"
        in (capsys.readouterr().err)
    )
    assert (
        cli.main(["reproduce", "mnist5k-pareto", "--tuned", "--set", "tuned.trials=0", "--out", str(out)])
        == 2
    )
    assert "tuned.trials and tuned.max_epochs must be integers >= 1, got (0, 20)" in capsys.readouterr().err
    assert not out.exists()


def test_a_tiny_tuned_study_end_to_end(tmp_path):
    out = tmp_path / "tuned"
    models = (
        "models=[{label: small, model: afmp_tiny, model_opts: {d_model: 16, num_layers: 2, k_dim: 8,"
        " score_hidden: 8}}, {label: smaller, model: afmp_tiny, model_opts: {d_model: 8, num_layers: 1,"
        " k_dim: 4, score_hidden: 4}}]"
    )
    sets = [DIGITS[0], models, "tuned.trials=1", "tuned.max_epochs=1", "train.batch_size=128"]
    sets += ["bench.warmup=0", "bench.repeats=1"]
    argv = ["reproduce", "mnist5k-pareto", "--tuned", "--seeds", "1", "--device", "cpu", "--out", str(out)]
    # a shared-recipe study that put "small" at 50% and "smaller" at 40%; the tuned study has
    # no pareto.csv yet, so its side of the table must be this run's, read after it is written
    shared = [_row("small", 50.0, 1.0, 1e-4, 1.0, 10.0), _row("smaller", 40.0, 1.0, 1e-5, 1.0, 10.0)]
    write_csv(tmp_path / "shared" / "pareto.csv", shared)
    argv += ["--shared", str(tmp_path / "shared")]
    assert cli.main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0
    report = (out / "report.md").read_text()
    assert "## The shared recipe against each model's tuned recipe" in report
    with open(out / "pareto.csv", newline="") as f:
        written = {r["run"]: r for r in csv.DictReader(f)}
    for label, was in (("small", "50.00 ± 1.00"), ("smaller", "40.00 ± 1.00")):
        now = f"{float(written[label]['accuracy']):.2f} ± {float(written[label]['accuracy_std']):.2f}"
        assert f"| {label} | {was} | {now} |" in report
    for label in ("small", "smaller"):
        best = json.loads((out / "search" / label / "best.json").read_text())
        assert best["budget"]["trials"] == {"complete": 1}
        run = json.loads((out / label / "seed0" / "results.json").read_text())
        assert run["config"]["lr"] == best["params"]["lr"] and run["test_accuracy"] is not None
        assert f"| {label} | {best['val_accuracy']:.2f} | 1 / 0 | 1 |" in report
    assert "## Each model's tuned recipe" in report and (out / "pareto.csv").is_file()


def _row(run, accuracy, std, gflops, ms_b1, ms_b64):
    return dict(
        run=run, accuracy=accuracy, accuracy_std=std, matmul_gflops=gflops, ms_b1=ms_b1, ms_b64=ms_b64
    )


def test_the_report_sets_the_shared_and_tuned_recipes_side_by_side(tmp_path):
    """Literal studies. Shared: AFMP (0.1 GFLOP, 95%) and ResNet (2.5 GFLOP, 98.5%) both on the
    FLOPs frontier, ResNet alone on both latency ones. Tuned: AFMP at 98.75% is alone on the
    FLOPs frontier and on both latency ones too; the ViT, not in the shared study, is the
    fastest at batch 1 only."""
    shared = [_row("afmp_tiny", 95.0, 0.5, 0.1, 2.0, 20.0), _row("resnet", 98.5, 0.1, 2.5, 1.0, 10.0)]
    tuned_rows = [
        _row("afmp_tiny", 98.75, 0.2, 0.1, 2.0, 20.0),
        _row("resnet", 98.5, 0.3, 2.5, 1.0, 10.0),
        _row("vit", 97.0, 1.0, 1.0, 0.5, 30.0),
    ]
    write_csv(tmp_path / "shared" / "pareto.csv", shared)
    write_csv(tmp_path / "tuned" / "pareto.csv", tuned_rows)
    lines = tuned.side_by_side("mnist5k-pareto", tmp_path / "tuned", tmp_path / "shared")
    assert lines[4:7] == [
        "| afmp_tiny | 95.00 ± 0.50 | 98.75 ± 0.20 | +3.75 | FLOPs | FLOPs, batch 1, batch 64 |",
        "| resnet | 98.50 ± 0.10 | 98.50 ± 0.30 | +0.00 | FLOPs, batch 1, batch 64 | batch 1, batch 64 |",
        "| vit | — | 97.00 ± 1.00 | — | — | batch 1 |",
    ]
    assert lines[8:10] == [
        "Verdict under the shared recipe: consistent with the claim: AFMP is on the FLOPs frontier and on no "
        "latency frontier.",
        "Verdict under the tuned recipes: not supported here: AFMP is on the FLOPs frontier and on a latency "
        "frontier too.",
    ]
    missing = tuned.side_by_side("mnist5k-pareto", tmp_path / "tuned", tmp_path / "never-run")
    assert missing[0].startswith(
        f"(No shared-recipe results in {tmp_path / 'never-run'}: run `afmp reproduce"
    )


# -- --recipe: an ablation at the recipe a search found ------------------------------------------
def _search_folder(tmp_path, params, model="afmp_tiny", dataset="mnist5k"):
    folder = tmp_path / "search"
    folder.mkdir()
    record = {
        "trial": 7,
        "val_accuracy": 97.25,
        "params": params,
        "config": {"model": model, "dataset": dataset},
    }
    (folder / "best.json").write_text(json.dumps(record))
    return folder


def test_an_ablation_at_a_searched_recipe_takes_the_trials_settings_and_keeps_what_it_varies(tmp_path):
    folder = _search_folder(tmp_path, {"lr": 0.0123, "epochs": 8, "warmup_epochs": 1.5, "data_opts.shift": 1})
    study = reproduce.load_study("mnist5k-sparsity")
    assert tuned.apply_recipe("mnist5k-sparsity", study, str(folder)) is study
    runs = reproduce.planned_runs(study, _args(), tmp_path / "out")
    assert len(runs) == 6 * 5
    assert {(c.lr, c.epochs, c.warmup_epochs, c.data_opts["shift"]) for _, _, c in runs} == {
        (0.0123, 8, 1.5, 1)
    }
    assert {(c.weight_decay, c.label_smoothing, c.batch_size) for _, _, c in runs} == {(0.05, 0.1, 64)}
    assert sorted({c.model_opts["sparsity"] for _, _, c in runs}) == [0.0, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert {
        (c.model_opts["d_model"], c.model_opts["patch_size"], c.model_opts["use_top_down"])
        for _, _, c in runs
    } == {(64, 4, True)}
    assert study["recipe"] == {"from": str(folder / "best.json"), "trial": 7, "val_accuracy": 97.25}
    assert reproduce.report.recipe_lines(study["recipe"]) == [
        f"Recipe: afmp tune's best trial (7, validation 97.25%) in `{folder / 'best.json'}`; its settings "
        "replace the config's where they name the same one.",
        "",
    ]
    assert reproduce.report.recipe_lines(None) == []


def test_a_recipe_for_another_model_or_data_set_or_a_pareto_study_is_refused(tmp_path):
    digits = _search_folder(tmp_path, {"lr": 0.01}, dataset="digits")
    vit = tmp_path / "vit"
    vit.mkdir()
    record = {"params": {}, "config": {"model": "vit_baseline_tiny", "dataset": "mnist5k"}}
    (vit / "best.json").write_text(json.dumps(record))
    cases = [
        ("mnist5k-topdown", digits, f"--recipe: {digits / 'best.json'} was searched for dataset 'digits', "
         "the mnist5k-topdown study trains 'mnist5k'"),
        ("mnist5k-topdown", vit / "best.json", "was searched for model 'vit_baseline_tiny', the mnist5k-topdown "
         "study trains 'afmp_tiny'"),
        ("mnist5k-pareto", digits, "--recipe is one model's recipe, for an ablation study; mnist5k-pareto is a "
         "pareto study"),
    ]  # fmt: skip
    for name, where, message in cases:
        study = reproduce.load_study(name)
        with pytest.raises(UsageError, match=re.escape(message)):
            tuned.apply_recipe(name, study, str(where))
        assert "recipe" not in study


def test_reproduce_with_no_search_at_the_recipe_path_stops_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        cli.main(["reproduce", "mnist5k-topdown", "--recipe", str(tmp_path / "nowhere"), "--out", str(out)])
        == 2
    )
    assert (
        f"--recipe: expected afmp tune's best.json, or the search folder that holds it; {tmp_path / 'nowhere'}"
        in (capsys.readouterr().err)
    )
    assert not out.exists()
