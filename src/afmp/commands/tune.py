"""`afmp tune`: a hyperparameter search over `afmp train`, on Optuna (``pip install "afmp[tune]"``).

    afmp tune --model afmp_tiny --dataset mnist5k -o patch_size=4 -o d_model=64 \\
        --trials 12 --max-epochs 20 --jobs 2 --out runs/tune-afmp
    afmp train --config runs/tune-afmp/best.yaml --out runs/afmp-tuned --seed 1

Every afmp train option sets what the trials share (model, data, batch size, seed...);
the search space (``--space``, by default the shipped afmp/configs/tune/spaces.yaml, one
space per model family) sets what they draw. A flag for a setting the space draws is
refused rather than silently overridden. The search is afmp.tuning.search; what it writes
is afmp.tuning.outcome.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from afmp.training import config as train_config
from afmp.training.config import check_config, config_from_args
from afmp.utils.errors import UsageError, usage_errors
from afmp.utils.options import parse_key_values
from afmp.utils.parallel import add_jobs_argument, check_jobs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trials", type=int, default=12, help="the budget: trials finished, over every session (default 12)"
    )
    p.add_argument("--max-epochs", type=int, metavar="N", help="no trial trains more than N epochs")
    p.add_argument("--space", help="search-space YAML, one space per model family (default: the shipped one)")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="where the study lives (default: sqlite:///OUT/study.db); a postgresql:// or mysql:// "
        "server lets several machines share one study",
    )
    p.add_argument("--study-name", help="the study's name in the storage (default: MODEL-DATASET)")
    p.add_argument(
        "--no-prune", dest="prune", action="store_false", help="train every trial to its last epoch"
    )
    add_jobs_argument(p, "run trials")
    train_config.add_arguments(p)  # what the trials share


def _flags_set(args: argparse.Namespace) -> set[str]:
    """The settings the command line fixes: flags, -o and --data-opt keys (not --config's)."""
    fixed = {name for name in vars(args) if name in train_config.CHECKS and getattr(args, name) is not None}
    for nested, pairs in (("model_opts", args.model_opt), ("data_opts", args.data_opt)):
        fixed |= {f"{nested}.{key}" for key in parse_key_values(pairs)}
    return fixed


def search_from_args(args: argparse.Namespace):
    """The Search the command line asks for, every input checked; nothing written."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UsageError(
            'afmp tune runs on Optuna: pip install "afmp[tune]" (or pip install optuna)'
        ) from None
    from afmp.tuning.search import Search
    from afmp.tuning.space import SPACES, load_space
    from afmp.tuning.storage import storage_url

    check_jobs(args.jobs)
    if args.trials < 1 or (args.max_epochs is not None and args.max_epochs < 1):
        raise UsageError(f"--trials and --max-epochs must be >= 1, got {args.trials} and {args.max_epochs}")
    if args.resume:
        raise UsageError(
            "--resume is afmp train's; run the same afmp tune command again to continue a search"
        )
    if args.out is None:
        args.out = f"runs/tune-{args.model or train_config.TrainConfig.model}-{args.dataset or train_config.TrainConfig.dataset}"
    base = config_from_args(args)
    check_config(base)
    path = Path(args.space) if args.space else SPACES
    space, notes = load_space(path, base, args.max_epochs)
    clash = sorted(_flags_set(args) & set(space))
    if clash:
        raise UsageError(
            f"the space ({path}) draws {', '.join(clash)}; leave {'it' if len(clash) == 1 else 'them'} "
            "off the command line, or pass a --space without"
        )
    if args.max_epochs is not None and "epochs" not in space:
        base = dataclasses.replace(base, epochs=min(base.epochs, args.max_epochs))
    for note in notes:
        print(f"space: {note}")
    return Search(
        base=base,
        space=space,
        out=base.out,
        storage=storage_url(Path(base.out), args.storage),
        study_name=args.study_name or f"{base.model}-{base.dataset}",
        trials=args.trials,
        jobs=args.jobs,
        prune=args.prune,
    )


def main(args: argparse.Namespace) -> int:
    with usage_errors():
        search = search_from_args(args)
    from afmp.tuning.search import run_search

    best = run_search(search)
    if best is not None:
        spent = best["budget"]
        print(
            f"best: trial {best['trial']}, val {best['val_accuracy']:.2f}%, {best['params']}\n"
            f"spent: trials {', '.join(f'{n} {state}' for state, n in spent['trials'].items())}; "
            f"{spent['epochs_trained']} epochs, {spent['wall_time_s']:.0f} s wall\n"
            f"wrote {Path(search.out) / 'best.yaml'} (afmp train --config takes it) and best.json"
        )
    return 0
