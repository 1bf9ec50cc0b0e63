"""`afmp ablate`: the notebook's three ablation studies, over several seeds.

    afmp ablate sparsity --dataset digits --epochs 40 --seeds 3 --out runs/abl-sparsity
    afmp ablate lambda   --dataset cifar100 --data-dir data --epochs 100 --seeds 3 --out ...
    afmp ablate topdown  --dataset digits --epochs 40 --seeds 3 --out runs/abl-topdown

Studies (the paper's text says the first two leave the top-down pass out, to isolate
routing; ``-o use_top_down=true`` runs them with it, as the notebook's model default does):

    sparsity  dense (rho = 0, lambda = 0) and rho in {0.2, 0.3, 0.4, 0.5, 0.6}
    lambda    lambda in {1e-3, 1e-4, 1e-5} at rho = 0.3
    topdown   with and without the top-down pass, at rho = 0.3, lambda = 1e-4

The summary compares every setting with the study's first one seed by seed (the same
seed gives both runs the same initial weights and batches): the mean and std of the
paired differences, and on how many seeds the setting was ahead.

Every ``afmp train`` option passes through (--model, --batch-size, --lr, --device, -o ...);
``--seed`` is the first seed, runs use seed, seed + 1, ... Each run is an ordinary
``afmp train`` run in ``OUT/<setting>/seed<k>/``; the study then writes ``OUT/summary.csv``
(mean and sample std over seeds) and ``OUT/comparison.png`` (the notebook's 2x2 figure).
Run the same command again to continue an interrupted study: finished runs (those with
a results.json) are kept, and with ``--resume`` a half-trained run continues from its
last epoch instead of starting again.
``--jobs N`` trains N runs at once, each in a process of
its own with cores / N torch threads (afmp.utils.parallel); the runs' numbers are those of
a serial study with as many threads per run (``--threads``): torch's CPU reductions split
their sums by thread, so the thread count alone can move the last digits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path

import numpy as np

from afmp.training import config as train_config
from afmp.training.config import RUNTIME_ONLY, TrainConfig, check_config, config_from_args
from afmp.training.rundir import RunLock, latest_checkpoint
from afmp.training.train import train
from afmp.utils.errors import UsageError, usage_errors
from afmp.utils.files import save_png, write_csv, write_json
from afmp.utils.parallel import add_jobs_argument, check_jobs, run_in_processes, threads_per_job

# study -> [(setting, plot label, the model options it varies)]
STUDIES: dict[str, list[tuple[str, str, dict]]] = {
    "sparsity": [
        ("dense", "Dense", {"sparsity": 0.0, "lambda_sparse": 0.0}),
        *[
            (f"rho{rho}", f"ρ={rho}", {"sparsity": rho, "lambda_sparse": 1e-4})
            for rho in (0.2, 0.3, 0.4, 0.5, 0.6)
        ],
    ],
    "lambda": [
        (f"lambda{lam}", f"λ={lam}", {"sparsity": 0.3, "lambda_sparse": float(lam)})
        for lam in ("1e-3", "1e-4", "1e-5")
    ],
    "topdown": [
        ("topdown", "Top-down", {"sparsity": 0.3, "lambda_sparse": 1e-4, "use_top_down": True}),
        ("no_topdown", "No top-down", {"sparsity": 0.3, "lambda_sparse": 1e-4, "use_top_down": False}),
    ],
}
# Options a study fixes for all its settings unless the user passes them with -o.
STUDY_DEFAULTS: dict[str, dict] = {"sparsity": {"use_top_down": False}, "lambda": {"use_top_down": False}}


def run_dir(out: Path, setting: str, seed: int) -> Path:
    return out / setting / f"seed{seed}"


def run_configs(study: str, base: TrainConfig, seeds: int) -> list[tuple[str, int, TrainConfig]]:
    """(setting, seed, config) of every run, replicate by replicate (a partial study stays balanced)."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose one of {', '.join(STUDIES)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    fixed = {k for _, _, opts in STUDIES[study] for k in opts}
    clash = sorted(fixed & set(base.model_opts))
    if clash:
        raise ValueError(f"the {study} study sets {', '.join(clash)} itself; do not pass them with -o")
    runs = []
    for seed in range(base.seed, base.seed + seeds):
        for setting, _, opts in STUDIES[study]:
            cfg = dataclasses.replace(
                base,
                seed=seed,
                out=str(run_dir(Path(base.out), setting, seed)),
                model_opts={**STUDY_DEFAULTS.get(study, {}), **base.model_opts, **opts},
            )
            runs.append((setting, seed, cfg))
    return runs


def _check_same_settings(cfg: TrainConfig, results: dict, path: Path) -> None:
    """A finished run is reused only if it was trained with the settings asked for now."""
    ignore = RUNTIME_ONLY | (
        {"batch_size"} if getattr(cfg, "auto_batch", False) else set()
    )  # found, not asked
    asked = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k not in ignore}
    done = {k: v for k, v in results.get("config", {}).items() if k not in ignore}
    # A setting added to afmp train after the run was trained counts as its default.
    defaults = json.loads(json.dumps(dataclasses.asdict(TrainConfig())))
    diff = sorted(k for k in asked.keys() | done.keys() if asked.get(k) != done.get(k, defaults.get(k)))
    if diff:
        details = ", ".join(f"{k}: {done.get(k)!r} there, {asked.get(k)!r} now" for k in diff)
        raise UsageError(f"{path} was trained with other settings ({details}); use a new --out")


def check_runs(runs: list[tuple[str, int, TrainConfig]]) -> None:
    """Every run's settings, before anything is written or trained."""
    with usage_errors():
        for _, _, cfg in runs:
            check_config(dataclasses.replace(cfg, resume=False))


def train_runs(runs: list[tuple[str, int, TrainConfig]], *, resume: bool, jobs: int = 1) -> None:
    """Train every (label, seed, config) run still missing (checked first with check_runs). A
    finished run (one with a results.json) is kept if it was trained with the same settings;
    a half-trained one continues from its last epoch with ``resume``, else starts again.
    ``jobs`` > 1 trains that many at once, each in its own process with cores / jobs threads
    (unless the runs set --threads): a run's numbers do not depend on it (tests/test_ablate.py)."""
    todo = []
    for n, (setting, seed, cfg) in enumerate(runs, 1):
        results_path = Path(cfg.out) / "results.json"
        if results_path.is_file():
            _check_same_settings(cfg, _read_results(results_path), results_path)
            print(f"[{n}/{len(runs)}] {setting} seed {seed}: done already, kept")
            continue
        partial = latest_checkpoint(cfg.out)[0] is not None
        if partial and not resume:
            print(
                f"[{n}/{len(runs)}] {setting} seed {seed}: partial run found, starting again (--resume continues it)"
            )
        todo.append(
            (f"[{n}/{len(runs)}] {setting} seed {seed}", dataclasses.replace(cfg, resume=resume and partial))
        )
    if jobs == 1:
        for label, cfg in todo:
            train_one(label, cfg)
        return
    threads = threads_per_job(jobs)
    run_in_processes(
        train_one,
        [(label, dataclasses.replace(cfg, threads=cfg.threads or threads)) for label, cfg in todo],
        jobs,
    )


def train_one(label: str, cfg: TrainConfig) -> None:
    """One run of a study (in a worker process with --jobs): its line, then afmp train's."""
    print(f"{label} -> {cfg.out}", flush=True)
    train(cfg)


def run_study(study: str, base: TrainConfig, seeds: int, jobs: int = 1) -> list[dict]:
    """Train every run still missing (``jobs`` at once), then write summary.csv and
    comparison.png; returns the summary rows."""
    out = Path(base.out)
    with usage_errors():
        check_jobs(jobs)
        runs = run_configs(study, base, seeds)
    check_runs(runs)
    with RunLock(out):  # one study writer; each run then locks its own folder
        write_json(out / "study.json", {"study": study, "seeds": seeds, "base": dataclasses.asdict(base)})
        train_runs(runs, resume=base.resume, jobs=jobs)
        rows = summarize(out, study, seeds=range(base.seed, base.seed + seeds))
    print_table(rows)
    return rows


def _read_results(path: Path) -> dict:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is not readable JSON ({err}); delete that run to train it again") from err
    if not isinstance(results, dict):
        raise UsageError(f"{path}: expected an object of results; delete that run to train it again")
    return results


# -- summary -------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single seed: no spread can be measured)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def load_results(out: Path, study: str, seeds) -> dict[str, list[dict]]:
    """setting -> the results.json of each of its finished seeds."""
    found = {}
    for setting, _, _ in STUDIES[study]:
        paths = [run_dir(out, setting, s) / "results.json" for s in seeds]
        found[setting] = [_read_results(p) for p in paths if p.is_file()]
    return found


def paired(reference: dict[int, float], other: dict[int, float]) -> dict:
    """``other`` minus ``reference`` seed by seed (accuracies keyed by seed), over their common
    seeds: mean and sample std of the differences, how many favour ``other``, and the
    two-sided p-value of a paired t-test (NaN with fewer than two pairs or no spread)."""
    common = sorted(reference.keys() & other.keys())
    diffs = [other[s] - reference[s] for s in common]
    if not diffs:
        return {"pairs": 0, "diff_mean": math.nan, "diff_std": math.nan, "ahead": 0, "p_value": math.nan}
    mean, std = _mean_std(diffs)
    p_value = math.nan
    if len(diffs) > 1 and std > 0:
        from scipy import stats

        p_value = float(stats.ttest_1samp(diffs, 0.0).pvalue)  # the paired t-test on the differences
    return {
        "pairs": len(diffs),
        "diff_mean": mean,
        "diff_std": std,
        "ahead": sum(d > 0 for d in diffs),
        "p_value": p_value,
    }


def summarize(out, study: str, seeds) -> list[dict]:
    """One row per setting over its finished seeds, with its test accuracy compared seed by seed
    to the study's first setting; writes summary.csv and comparison.png."""
    out = Path(out)
    results = load_results(out, study, seeds)
    reference = {r["config"]["seed"]: r["test_accuracy"] for r in results[STUDIES[study][0][0]]}
    rows = []
    for setting, label, _ in STUDIES[study]:
        runs = results[setting]
        if not runs:
            continue
        val_mean, val_std = _mean_std([r["best_val_accuracy"] for r in runs])
        test_mean, test_std = _mean_std([r["test_accuracy"] for r in runs])
        times = [t for r in runs for t in r["training_history"]["time"]]
        vs = paired(reference, {r["config"]["seed"]: r["test_accuracy"] for r in runs})
        rows.append(
            {
                "setting": setting,
                "label": label,
                "seeds": len(runs),
                "best_val_mean": val_mean,
                "best_val_std": val_std,
                "test_mean": test_mean,
                "test_std": test_std,
                "vs": STUDIES[study][0][0],
                **{f"test_{k}": v for k, v in vs.items()},
                "epoch_time_s": statistics.fmean(times),
                "params": runs[0]["params"],
            }
        )
    if not rows:
        raise ValueError(f"no finished runs of the {study} study under {out}")

    write_csv(out / "summary.csv", rows)
    plot_comparison(results, rows, out / "comparison.png", title=f"{study} ablation")
    return rows


def table_lines(rows: list[dict]) -> list[str]:
    """The summary as a markdown table; the paired column is each setting minus the first."""
    lines = [
        f"| setting | seeds | best val % | test % | test − {rows[0]['label']} (paired) | ahead | p | s / epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        first = r["setting"] == r["vs"]
        lines.append(
            f"| {r['label']} | {r['seeds']} | {r['best_val_mean']:.2f} ± {r['best_val_std']:.2f} | "
            f"{r['test_mean']:.2f} ± {r['test_std']:.2f} | "
            + (
                "— | — | — |"
                if first
                else f"{r['test_diff_mean']:+.2f} ± {r['test_diff_std']:.2f} | "
                f"{r['test_ahead']}/{r['test_pairs']} | {r['test_p_value']:.3f} |"
            )
            + f" {r['epoch_time_s']:.2f} |"
        )
    return lines


def print_table(rows: list[dict]) -> None:
    print("\n".join(table_lines(rows)))


def _curves(runs: list[dict], key: str) -> np.ndarray:
    """(seeds, epochs) of one history entry; a run stopped early is cut to the shortest."""
    length = min(len(r["training_history"][key]) for r in runs)
    return np.array([r["training_history"][key][:length] for r in runs], dtype=float)


def plot_comparison(results: dict[str, list[dict]], rows: list[dict], path: Path, *, title: str) -> Path:
    """The notebook's 2x2 figure, with seed means (lines) and ± one std (bands)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    panels = [
        (axes[0, 0], "val_acc", "Validation Accuracy", "Accuracy (%)"),
        (axes[0, 1], "train_loss", "Training Loss", "Loss"),
        (axes[1, 0], "sparsity_loss", "Sparsity Loss", "Loss Value"),
    ]
    for row in rows:
        runs = results[row["setting"]]
        for ax, key, _, _ in panels:
            curves = _curves(runs, key)
            epochs = np.arange(1, curves.shape[1] + 1)
            mean = curves.mean(0)
            label = row["label"]
            if key == "val_acc":
                label += f" (Best: {row['best_val_mean']:.2f}" + (
                    f" ± {row['best_val_std']:.2f}%)" if row["seeds"] > 1 else "%)"
                )
            (line,) = ax.plot(epochs, mean, label=label)
            if len(runs) > 1:
                std = curves.std(0, ddof=1)
                ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    for ax, _, name, ylabel in panels:
        ax.set(title=name, xlabel="Epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True)
        ax.legend()
    ax = axes[1, 1]
    times = [[t for r in results[row["setting"]] for t in r["training_history"]["time"]] for row in rows]
    ax.bar(
        [row["label"] for row in rows],
        [statistics.fmean(t) for t in times],
        yerr=[statistics.stdev(t) if len(t) > 1 else 0.0 for t in times],
        capsize=4,
    )
    ax.set(title="Average Per-Epoch Training Time", ylabel="Seconds")
    fig.suptitle(f"{title}: mean over seeds, band = ± one std")
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
    return path


# -- command line ----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", choices=list(STUDIES), help="which ablation study")
    p.add_argument("--seeds", type=int, default=3, help="runs per setting (seeds --seed, --seed + 1, ...)")
    add_jobs_argument(p, "train the runs")
    train_config.add_arguments(p)  # every afmp train option passes through


def main(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = f"runs/ablate-{args.study}-{args.dataset or TrainConfig.dataset}"
    with usage_errors():
        base = config_from_args(args)
    run_study(args.study, base, args.seeds, args.jobs)
    return 0
