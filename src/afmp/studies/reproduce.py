"""`afmp reproduce STUDY`: one of the paper's studies, from a config shipped with afmp.

    afmp reproduce                                    # list the studies and the claim each tests
    afmp reproduce ablation-sparsity --data-dir ~/data --out runs/repro-sparsity
    afmp reproduce pareto --data-dir ~/data --dry-run # the runs and what they will cost
    afmp reproduce mnist5k-topdown --set seeds=3 --set train.epochs=5

A study is a YAML file in ``afmp/configs/studies/`` (its comment names the claim, the
recipe and any departure from the notebook). Three kinds:

- ``ablation``: an ``afmp ablate`` study (``study:``) with the ``train:`` settings.
- ``pareto``: every model of ``models:`` trained with the ``train:`` settings over the
  seeds, then its first seed measured by ``afmp bench pareto``'s machinery (FLOPs, latency
  at batch 1 and 64, on this device); accuracy is the mean over seeds, with its std.
- ``scaling``: ``afmp bench`` with the ``bench:`` settings.

Runs go to ``OUT/<setting or model>/seed<k>/``; running the same command again continues
where it stopped (finished runs are kept, if they were trained with the same settings).
Each study ends with its figure and ``report.md``: the claim, our numbers with their
spread, and whether the spread allows a conclusion. ``--set KEY=VALUE`` changes any
entry of the config (dotted: ``train.batch_size=32``, ``bench.repeats=3``, ``seeds=1``).
``--jobs N`` trains N runs at once (each in its own process, with cores / N threads).
``--tuned`` (a pareto study with a ``tuned:`` section) first searches every model's recipe
with the same budget, then trains the seeds at each one's best: afmp.studies.tuned;
``--recipe SEARCH`` runs an ablation study at the recipe such a search found.
``--dry-run`` trains nothing: it prints the runs and their cost (afmp.studies.cost).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
from pathlib import Path

import yaml

from afmp.studies import cost, report
from afmp.utils.errors import UsageError, usage_errors
from afmp.utils.options import parse_key_value
from afmp.utils.parallel import add_jobs_argument, check_jobs

STUDY_DIR = Path(__file__).parents[1] / "configs" / "studies"
KINDS = ("ablation", "pareto", "scaling")
# What a pareto study's entry may set for its own runs besides model and model_opts: a
# data set of its own, for a reference model on another view of the same images.
ENTRY_SETTINGS = ("dataset",)


def studies() -> dict[str, Path]:
    return {p.stem: p for p in sorted(STUDY_DIR.glob("*.yaml"))}


def load_study(name: str, sets: list[str] | None = None) -> dict:
    """The study's config with the ``--set`` changes applied, checked."""
    known = studies()
    if name not in known:
        raise UsageError(f"unknown study {name!r}; choose one of: {', '.join(known)}")
    study = yaml.safe_load(known[name].read_text())
    for item in sets or []:
        with usage_errors():
            key, value = parse_key_value(item, flag="--set", example="train.epochs=2")
        *path, last = key.split(".")
        node = study
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {key}: {part} is not a section of the {name} config")
        node[last] = value
    if study.get("kind") not in KINDS:
        raise UsageError(f"{name}: kind must be one of {', '.join(KINDS)}, got {study.get('kind')!r}")
    if study.get("verdict", "frontiers") not in report.VERDICTS:
        raise UsageError(
            f"{name}: verdict must be one of {', '.join(report.VERDICTS)}, got {study['verdict']!r}"
        )
    seeds = study.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise UsageError(f"{name}: seeds must be an integer >= 1, got {seeds!r}")
    return study


def train_config(study: dict, args, **fields):
    """A TrainConfig from the study's ``train:`` section, the command line and ``fields``."""
    from afmp.training.config import TrainConfig

    values = copy.deepcopy(study.get("train", {}))
    values["model_opts"] = {**values.get("model_opts", {}), **fields.pop("model_opts", {})}
    values.update(fields)
    for name in ("data_dir", "device", "download"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise UsageError(f"unknown train setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return TrainConfig(**values)


# -- the runs of a study ----------------------------------------------------------------------
def planned_runs(study: dict, args, out: Path) -> list[tuple[str, int, object]]:
    """(label, seed, TrainConfig) of every training run, replicate by replicate."""
    from afmp.studies import ablate

    if study["kind"] == "ablation":
        base = train_config(study, args, out=str(out))
        return ablate.run_configs(study["study"], base, study["seeds"])
    if study["kind"] == "pareto":
        runs = []
        for seed in range(study["seeds"]):
            for entry in study["models"]:
                cfg = train_config(
                    study,
                    args,
                    model=entry["model"],
                    model_opts=dict(entry.get("model_opts", {})),
                    **{key: entry[key] for key in ENTRY_SETTINGS if key in entry},
                    seed=seed,
                    out=str(out / entry["label"] / f"seed{seed}"),
                )
                runs.append((entry["label"], seed, cfg))
        return runs
    return []


# -- the studies: train or measure, write the tables and figures, then the report's lines ------
def run_ablation(name: str, study: dict, runs, out: Path, jobs: int = 1) -> list[str]:
    from afmp.studies import ablate

    ablate.train_runs(runs, resume=True, jobs=jobs)  # a half-trained run continues
    rows = ablate.summarize(out, study["study"], range(runs[0][2].seed, runs[0][2].seed + study["seeds"]))
    return report.ablation_lines(rows)


def run_pareto_study(name: str, study: dict, runs, out: Path, args) -> list[str]:
    import torch

    from afmp.bench import pareto, plots, scaling
    from afmp.measure import roofline, timing
    from afmp.studies import ablate
    from afmp.utils.files import write_table
    from afmp.utils.runtime import resolve_device

    ablate.train_runs(runs, resume=True, jobs=args.jobs)  # a half-trained run continues
    labels = [e["label"] for e in study["models"]]
    by_label = {label: [r for r in runs if r[0] == label] for label in labels}
    device = resolve_device(runs[0][2].device)
    bench = study.get("bench", {})
    cfg = scaling.BenchConfig(
        models=[runs[0][2].model],
        resolutions=[1],
        device=str(device),
        warmup=bench.get("warmup", 2),
        repeats=bench.get("repeats", 5),
        out=str(out),
    )
    calib = roofline.load_or_calibrate(device, torch.float32)
    if device.type == "cpu":  # as afmp bench times on the CPU: freed memory kept for reuse
        timing.keep_freed_memory()
    first = [Path(by_label[label][0][2].out) for label in labels]
    rows = pareto.run_pareto([str(p) for p in first], cfg, calib, device)
    # Test accuracy by seed; a seed fixes every model's batches, so models compare seed by seed.
    by_seed = {
        label: {c.seed: pareto.read_accuracy(Path(c.out)) for _, _, c in by_label[label]} for label in labels
    }
    for row, label in zip(rows, labels):
        accs = list(by_seed[label].values())
        vs = ablate.paired(by_seed[labels[0]], by_seed[label])
        row.update(
            run=label,
            label=label,  # what report.verdict_paired names a row by
            accuracy=statistics.fmean(accs),
            accuracy_std=statistics.stdev(accs) if len(accs) > 1 else math.nan,
            seeds=len(accs),
            **{f"test_{k}": v for k, v in vs.items()},
        )
    paired_columns = [f"test_{k}" for k in ("diff_mean", "diff_std", "ahead", "pairs", "p_value")]
    write_table(out, "pareto", rows, [*pareto.CSV_COLUMNS, "accuracy_std", "seeds", *paired_columns])
    plots.plot_pareto(
        rows, out / "pareto.png", pareto.panels(rows), title=f"{name}: test accuracy against cost"
    )
    return report.pareto_lines(
        name, rows, labels, calib["device"], cfg.repeats, study.get("verdict", "frontiers")
    )


def run_scaling_study(name: str, study: dict, out: Path, args) -> list[str]:
    import torch

    from afmp.bench import plots, scaling
    from afmp.measure import roofline
    from afmp.utils.files import write_table

    bench = dict(study["bench"])
    if args.device is not None:
        bench["device"] = args.device
    if bench.get("device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"{name} runs on {bench['device']}, but CUDA is not available here; --device cpu to try it"
        )
    with usage_errors():
        cfg = scaling.BenchConfig(**bench, out=str(out))
    device = torch.device(cfg.device)
    calib = roofline.load_or_calibrate(device, scaling.DTYPES[cfg.dtype])
    rows = scaling.run_scaling(cfg, calib)
    write_table(out, "scaling", rows, scaling.COLUMNS)
    what = f"batch {cfg.batch_size}, {cfg.mode}, {cfg.dtype}, {calib['device']}"
    plots.plot_against_tokens(rows, "ms_median", "step time (ms)", out / "time_vs_tokens.png", what)
    plots.plot_against_tokens(rows, "peak_mb", "peak memory (MB)", out / "memory_vs_tokens.png", what)
    return report.scaling_lines(rows, what)


# -- command line ------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    lines = []
    for name, path in studies().items():
        claim = yaml.safe_load(path.read_text()).get("claim", "")
        lines.append(f"  {name:20s} {claim}")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "studies:\n" + "\n".join(lines)
    p.add_argument("study", nargs="?", metavar="STUDY", help="which study (listed below)")
    p.add_argument("--out", help="output directory (default runs/reproduce-STUDY)")
    p.add_argument("--data-dir", help="where the data set's files are")
    p.add_argument("--download", action="store_true", default=None, help="download the data set if missing")
    p.add_argument("--device", help="auto, cpu, cuda ... (default: the config's, else auto)")
    p.add_argument("--seeds", type=int, help="seeds per setting (default: the config's)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the config's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a config entry (dotted keys)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their cost; train nothing")
    p.add_argument("--tflops", type=float, help="--dry-run: also the time the FLOPs take at this rate")
    add_jobs_argument(p, "train the study's runs")
    p.add_argument(
        "--tuned",
        action="store_true",
        help="first search every model's recipe with the same budget (the study's tuned: section), "
        "then train the seeds at each one's best (afmp.studies.tuned)",
    )
    p.add_argument(
        "--recipe",
        metavar="SEARCH",
        help="an ablation study at the recipe afmp tune found: the search's folder or its best.json "
        "(its best trial's settings replace the study's train: settings they name)",
    )
    p.add_argument(
        "--shared",
        metavar="DIR",
        help="--tuned: the same study run at its shared recipe, for the report's side-by-side table "
        "(default runs/reproduce-STUDY)",
    )


def main(args: argparse.Namespace) -> int:
    if args.study is None:
        for name, path in studies().items():
            print(f"{name:20s} {yaml.safe_load(path.read_text()).get('claim', '')}")
        return 0
    sets = list(args.set or [])
    if args.seeds is not None:
        sets.append(f"seeds={args.seeds}")
    if args.epochs is not None:
        sets.append(f"train.epochs={args.epochs}")
    with usage_errors():
        check_jobs(args.jobs)
        study = load_study(args.study, sets)
        if args.recipe:
            from afmp.studies.tuned import apply_recipe

            apply_recipe(args.study, study, args.recipe)
        out = Path(args.out or f"runs/reproduce-{args.study}{'-tuned' if args.tuned else ''}")
        runs = planned_runs(study, args, out)
    from afmp.studies import ablate

    ablate.check_runs(runs)  # every run's settings, before anything is written
    if args.tuned:
        from afmp.studies import tuned

        searches = tuned.searches(args.study, study, args, out)  # every model's search, checked
        if args.dry_run:
            tuned.dry_run(args.study, study, searches, args)
            return 0
    elif args.dry_run:
        cost.dry_run(args.study, study, runs, args)
        return 0
    from afmp.training.rundir import RunLock
    from afmp.utils.files import write_json

    with RunLock(out):
        write_json(out / "study.json", {"study": args.study, "config": study})
        if args.tuned:
            body = tuned.run(args.study, study, searches, args, out)
        elif study["kind"] == "ablation":
            body = run_ablation(args.study, study, runs, out, args.jobs)
        elif study["kind"] == "pareto":
            body = run_pareto_study(args.study, study, runs, out, args)
        else:
            body = run_scaling_study(args.study, study, out, args)
        written = report.write_report(out, args.study, study, body)
    print("\n".join(body))
    print(f"wrote {written}")
    return 0
