"""`afmp reproduce STUDY --tuned`: a Pareto study at each model's own recipe, found with the
same search budget for every model.

A study with a ``tuned:`` section (``{trials: T, max_epochs: E}``; mnist5k-pareto's) runs,
for every model of ``models:``, an ``afmp tune`` search of T trials of at most E epochs
(pruned on validation accuracy, the shipped search space of the model's family, the
study's ``train:`` settings as what the trials share) in ``OUT/search/<label>/``; then the
study's seeds at that model's best recipe in ``OUT/<label>/seed<k>/``, measured and reported
as the shared-recipe study is (afmp.studies.reproduce). The test split is read by those
final runs only. Run the same command again and it continues: finished searches and runs
are kept. ``--dry-run`` prints the plan and an upper bound of its cost.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from afmp.studies import cost, reproduce
from afmp.utils.errors import UsageError, usage_errors


def budget(name: str, study: dict) -> tuple[int, int]:
    """The study's (trials, max_epochs) for every model's search, checked."""
    tuned = study.get("tuned")
    if study["kind"] != "pareto" or not isinstance(tuned, dict):
        with_budget = [n for n, p in reproduce.studies().items() if "\ntuned:" in p.read_text()]
        raise UsageError(
            f"--tuned needs a pareto study with a tuned: section ({', '.join(with_budget) or 'none'}); {name} has none"
        )
    values = (tuned.get("trials"), tuned.get("max_epochs"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise UsageError(f"{name}: tuned.trials and tuned.max_epochs must be integers >= 1, got {values}")
    return values


def searches(name: str, study: dict, args, out: Path) -> list:
    """One afmp tune Search per model of the study, all with the same budget; nothing written."""
    from afmp.training.config import check_config
    from afmp.tuning.search import Search
    from afmp.tuning.space import SPACES, load_space
    from afmp.tuning.storage import storage_url

    trials, max_epochs = budget(name, study)
    found = []
    for entry in study["models"]:
        where = out / "search" / entry["label"]
        base = reproduce.train_config(
            study,
            args,
            model=entry["model"],
            model_opts=dict(entry.get("model_opts", {})),
            seed=0,
            out=str(where),
        )
        with usage_errors():
            check_config(base)
            space, _ = load_space(SPACES, base, max_epochs)
        found.append(
            Search(
                base=base,
                space=space,
                out=str(where),
                storage=storage_url(where, None),
                study_name=entry["label"],
                trials=trials,
                jobs=args.jobs,
            )
        )
    return found


def final_runs(study: dict, found: list, best: dict[str, dict], out: Path) -> list[tuple[str, int, object]]:
    """(label, seed, TrainConfig) of the seeds at each model's best recipe, replicate by replicate."""
    from afmp.tuning.space import trial_config

    runs = []
    for seed in range(study["seeds"]):
        for search in found:
            label = search.study_name
            cfg = trial_config(search.base, best[label]["params"])
            runs.append(
                (label, seed, dataclasses.replace(cfg, seed=seed, out=str(out / label / f"seed{seed}")))
            )
    return runs


def recipe_lines(found: list, best: dict[str, dict]) -> list[str]:
    """The report's table of what each model's search found and what it spent."""
    names = sorted({p for s in found for p in s.space})
    lines = [
        "## Each model's tuned recipe (its search's best trial, on validation data)",
        "",
        "| model | best val % | trials (complete / pruned) | epochs trained | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for search in found:
        record = best[search.study_name]
        spent = record["budget"]
        counts = f"{spent['trials'].get('complete', 0)} / {spent['trials'].get('pruned', 0)}"
        values = [record["params"].get(n) for n in names]
        shown = [f"{v:.3g}" if isinstance(v, float) else ("—" if v is None else str(v)) for v in values]
        lines.append(
            f"| {search.study_name} | {record['val_accuracy']:.2f} | {counts} | {spent['epochs_trained']} | "
            + " | ".join(shown)
            + " |"
        )
    return [*lines, ""]


def dry_run(name: str, study: dict, found: list, args) -> None:
    """The plan and an upper bound of its cost: every trial and every seed at the most epochs."""
    trials, max_epochs = budget(name, study)
    print(
        f"{name} --tuned: for each of {len(found)} models, a search of {trials} trials of at most {max_epochs} "
        f"epochs (pruned trials stop early), then {study['seeds']} seed(s) at its best recipe (at most "
        f"{max_epochs} epochs); each search runs {args.jobs} trial(s) at a time. Cost if no trial were "
        "pruned and every recipe drew the most epochs (an upper bound):"
    )
    runs = [
        (s.study_name, 0, dataclasses.replace(s.base, epochs=max_epochs))
        for s in found
        for _ in range(trials + study["seeds"])
    ]
    cost.dry_run(name, study, runs, args)
    if args.jobs > 1:
        print(
            f"with --jobs {args.jobs}: about that divided by {args.jobs} at best, on {args.jobs} or more cores"
        )


def run(name: str, study: dict, found: list, args, out: Path) -> list[str]:
    """Search every model (``found``: ``searches``'), then train, measure and report its seeds;
    returns the report's lines."""
    from afmp.studies import ablate
    from afmp.tuning.search import run_search

    best = {}
    for search in found:
        print(f"== {search.study_name}: a search of {search.trials} trials -> {search.out}")
        best[search.study_name] = run_search(search)
        if best[search.study_name] is None:
            raise UsageError(
                f"no trial of {search.study_name}'s search completed; see {search.out}/trials.csv"
            )
    runs = final_runs(study, found, best, out)
    ablate.check_runs(runs)
    body = reproduce.run_pareto_study(name, study, runs, out, args)
    return (
        recipe_lines(found, best)
        + side_by_side(name, out, Path(args.shared or f"runs/reproduce-{name}"))
        + body
    )


def side_by_side(name: str, out: Path, shared: Path) -> list[str]:
    """The shared-recipe study's table beside the tuned one (both read from their pareto.csv),
    or how to get it when the shared study has not been run into ``shared``."""
    from afmp.studies import report

    if not (shared / "pareto.csv").is_file():
        return [
            f"(No shared-recipe results in {shared}: run `afmp reproduce {name} --out {shared}`, or pass "
            "--shared with its folder, then this command again, for the two recipes side by side.)",
            "",
        ]
    return report.recipes_lines(
        report.read_pareto_rows(shared / "pareto.csv"), report.read_pareto_rows(out / "pareto.csv")
    )


# -- --recipe: an ablation study at the recipe a search found -----------------------------------
def apply_recipe(name: str, study: dict, where: str) -> dict:
    """``study`` (an ablation) at the recipe an ``afmp tune`` search found: ``where`` is the
    search's best.json or its folder. The best trial's parameters (lr, epochs, data_opts.shift,
    ...) replace the ``train:`` settings they name; what the study varies and its model's
    options stay its own. The recipe is recorded under ``recipe:``, so study.json says which
    one the runs were trained at, and a resumed study keeps only runs at that recipe."""
    import json

    if study["kind"] != "ablation":
        raise UsageError(
            f"--recipe is one model's recipe, for an ablation study; {name} is a {study['kind']} study "
            "(a pareto study searches every model's own recipe with --tuned)"
        )
    path = Path(where)
    path = path / "best.json" if path.is_dir() else path
    try:
        record = json.loads(path.read_text())
        params, searched = record["params"], record["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(
            f"--recipe: expected afmp tune's best.json, or the search folder that holds it; {path}: {err}"
        ) from None
    train = study.setdefault("train", {})
    for key in ("model", "dataset"):
        if searched.get(key) != train.get(key):
            raise UsageError(
                f"--recipe: {path} was searched for {key} {searched.get(key)!r}, the {name} study "
                f"trains {train.get(key)!r}"
            )
    for dotted, value in params.items():
        group, dot, key = dotted.partition(".")
        if dot:
            train.setdefault(group, {})[key] = value
        else:
            train[dotted] = value
    study["recipe"] = {
        "from": str(path),
        "trial": record.get("trial"),
        "val_accuracy": record.get("val_accuracy"),
    }
    return study
