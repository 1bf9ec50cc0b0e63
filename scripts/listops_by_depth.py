"""Test accuracy of trained ListOps runs by nesting depth, beside the root-operator rule.

    python3 scripts/listops_by_depth.py --data-dir DIR RUN [RUN ...]

DIR holds basic_{train,test}.tsv; each RUN is an `afmp train` run directory on that data.
Prints one row per depth: examples, and the accuracy of the root-operator rule (fitted on
train, afmp.data.listops.baselines) and of each run's tested weights (model.safetensors).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from afmp.data import listops
from afmp.data.text import pad_collate
from afmp.training.checkpoint import load_checkpoint


def depth(source: str) -> int:
    deepest = level = 0
    for tok in source.split():
        if tok in listops.OPERATORS or tok in listops.EXTRA_OPERATORS:
            level += 1
            deepest = max(deepest, level)
        elif tok == listops.END:
            level -= 1
    return deepest


@torch.no_grad()
def predictions(run: Path, sources: list[str]) -> list[int]:
    model = load_checkpoint(run).eval()
    out = []
    for i in range(0, len(sources), 256):
        batch = [(torch.tensor(listops.encode(s)), 0) for s in sources[i : i + 256]]
        tokens, _ = pad_collate(batch)
        out += model(tokens).argmax(-1).tolist()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("runs", nargs="+")
    args = p.parse_args()
    root = Path(args.data_dir)
    train = listops.read_tsv(root / "basic_train.tsv")
    sources, targets = listops.read_tsv(root / "basic_test.tsv")
    depths = [depth(s) for s in sources]
    columns = {"root-operator rule": None, **{Path(r).name: predictions(Path(r), sources) for r in args.runs}}
    print("| depth | examples | " + " | ".join(columns) + " |")
    print("| --- | --- |" + " --- |" * len(columns))
    for d in sorted(set(depths)) + ["all"]:
        idx = [i for i, x in enumerate(depths) if d == "all" or x == d]
        sub = ([sources[i] for i in idx], [targets[i] for i in idx])
        cells = []
        for pred in columns.values():
            if pred is None:
                cells.append(f"{listops.baselines(train, sub)['root_operator']:.1f}")
            else:
                cells.append(f"{100 * sum(pred[i] == targets[i] for i in idx) / len(idx):.1f}")
        print(f"| {d} | {len(idx)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
