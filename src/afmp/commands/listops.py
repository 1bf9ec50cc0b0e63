"""`afmp listops generate`: write LRA's ListOps files (basic_{train,val,test}.tsv).

LRA's defaults are 96,000 / 2,000 / 2,000 examples of length 500-2,000 (lengths
strictly inside the window, counting digits, operators and ']' but not parentheses);
a CPU-sized set: ``--train 2000 --val 500 --test 1000 --min-length 50 --max-length 200``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from afmp.data import listops
from afmp.utils.errors import UsageError, usage_errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    g = sub.add_parser("generate", help="generate ListOps TSV files as LRA's generator does")
    g.add_argument("--out", required=True, help="folder for basic_{train,val,test}.tsv")
    g.add_argument("--train", type=int, default=96_000, help="training examples (LRA: 96000)")
    g.add_argument("--val", type=int, default=2_000, help="validation examples (LRA: 2000)")
    g.add_argument("--test", type=int, default=2_000, help="test examples (LRA: 2000)")
    g.add_argument("--min-length", type=int, default=500, help="lengths are > this (LRA: 500)")
    g.add_argument("--max-length", type=int, default=2000, help="lengths are < this (LRA: 2000)")
    g.add_argument("--max-depth", type=int, default=10, help="nesting limit (LRA: 10)")
    g.add_argument("--max-args", type=int, default=10, help="arguments per operator, 2..this (LRA: 10)")
    g.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("baselines", help="accuracy of the majority class and the root-operator rule")
    b.add_argument("--data-dir", required=True, help="folder with basic_{train,val,test}.tsv")


def baselines(data_dir: str) -> int:
    """Print what a model must beat on val and test: rules fitted on the training split."""
    root = Path(data_dir)
    missing = [f"basic_{s}.tsv" for s in listops.SPLITS if not (root / f"basic_{s}.tsv").is_file()]
    if missing:
        raise UsageError(
            f"--data-dir {root}: no {', '.join(missing)} (write them with afmp listops generate)"
        )
    with usage_errors():
        splits = {s: listops.read_tsv(root / f"basic_{s}.tsv") for s in listops.SPLITS}
        for split in ("val", "test"):
            got = listops.baselines(splits["train"], splits[split])
            print(
                f"{split}: majority class {got['majority']:.2f}%  root-operator rule {got['root_operator']:.2f}%  "
                f"({len(splits[split][1])} examples)"
            )
    return 0


def main(args: argparse.Namespace) -> int:
    if args.action == "baselines":
        return baselines(args.data_dir)
    for name in ("train", "val", "test"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
    started = time.perf_counter()
    settings = listops.generate_files(
        args.out,
        num_train=args.train,
        num_val=args.val,
        num_test=args.test,
        min_length=args.min_length,
        max_length=args.max_length,
        max_depth=args.max_depth,
        max_args=args.max_args,
        seed=args.seed,
    )
    print(
        f"wrote {settings['num_train']} / {settings['num_val']} / {settings['num_test']} examples of length "
        f"{args.min_length + 1}-{args.max_length - 1} to {args.out}/basic_{{train,val,test}}.tsv "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return 0
