"""`afmp compare`: one table over several training runs: parameters, FLOPs, latency, accuracy.

    afmp compare --runs runs/a runs/b --out runs/cmp

FLOPs and latency come from the same machinery as `afmp bench` (afmp.measure.counting's
counter, afmp.measure.timing's timer: CUDA events on a GPU), for one image, in inference,
so that a run gets the same figures here as in `afmp bench pareto`. Rows are labelled by
model, data set and seed. Writes compare.csv and compare.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from afmp.measure import counting, timing
from afmp.training.checkpoint import load_checkpoint
from afmp.training.rundir import run_labels
from afmp.utils.errors import usage_errors
from afmp.utils.files import atomic_write, write_csv
from afmp.utils.runtime import autocast, resolve_device


def load_runs(runs: list[str | Path], device: torch.device) -> list[tuple]:
    """(run, results, model on ``device``) of each run directory."""
    loaded = []
    for run in map(Path, runs):
        results_path = run / "results.json"
        if not results_path.is_file():
            raise FileNotFoundError(f"{run}: no results.json (is it a run directory of afmp train?)")
        try:
            results = json.loads(results_path.read_text())
        except ValueError as err:
            raise ValueError(f"{results_path} is not readable JSON ({err})") from err
        if not isinstance(results, dict):
            raise ValueError(f"{results_path}: expected an object of results")
        loaded.append((run, results, load_checkpoint(run, device=device).eval()))
    return loaded


@torch.no_grad()
def median_latency_ms(
    model: torch.nn.Module, x: torch.Tensor, *, warmup: int = 3, repeats: int = 10
) -> float:
    def step():
        with autocast(x.device, True):
            model(x)

    for _ in range(warmup):
        step()
    return statistics.median(timing.time_step_ms(step, x.device) for _ in range(repeats))


def compare_runs(
    runs: list[str | Path], *, device: str = "auto", warmup: int = 3, repeats: int = 10
) -> list[dict]:
    dev = resolve_device(device)
    rows = []
    loaded = load_runs(runs, dev)
    for label, (_, results, model) in zip(run_labels([r[0] for r in loaded]), loaded):
        x = model.example_input(1)
        with torch.no_grad():
            costs = counting.count(lambda model=model, x=x: model(x))
        rows.append(
            {
                "run": label,
                "model": model.model_name,
                "dataset": results.get("dataset"),
                "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                "matmul_gflops": round(costs.matmul_flops / 1e9, 4),
                "total_gflops": round(costs.total_flops / 1e9, 4),
                "latency_ms": round(median_latency_ms(model, x, warmup=warmup, repeats=repeats), 3),
                "device": str(dev),
                "best_val_acc": results.get("best_val_accuracy"),
                "test_acc": results.get("test_accuracy"),
            }
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [
            f"{row[k]:.2f}" if isinstance(row[k], float) and k.endswith("acc") else str(row[k]) for k in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", required=True, metavar="DIR", help="run directories of afmp train")
    p.add_argument("--out", required=True, help="folder for compare.csv and compare.md")
    p.add_argument("--device", default="auto", help="where latency is timed")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)


def main(args: argparse.Namespace) -> int:
    with usage_errors():
        load_runs(args.runs, resolve_device(args.device))  # every run readable before any is timed
    rows = compare_runs(args.runs, device=args.device, warmup=args.warmup, repeats=args.repeats)
    out = Path(args.out)
    write_csv(out / "compare.csv", rows)
    table = markdown_table(rows)
    atomic_write(out / "compare.md", lambda tmp: tmp.write_text(table))
    print(table, end="")
    print(f"wrote {out / 'compare.csv'} and {out / 'compare.md'}")
    return 0
