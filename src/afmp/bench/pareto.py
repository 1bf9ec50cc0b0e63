"""Accuracy against cost for trained runs: FLOPs and latency at batch 1 (as the paper) and 64.

Each run directory holds results.json (``test_accuracy``), model.json and
model.safetensors (written by ``afmp train``). Every model is measured in inference
at its own trained size, with the scaling study's machinery (interleaved timing,
counted costs), and plotted with its Pareto frontier: a run is on the frontier
when no other run is both cheaper and more accurate. A point-set model's size is the
largest set of its data (results.json's ``data``), where training counts its FLOPs
(afmp.training.batch_size): every set of the batch-64 step is padded to about that.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from afmp.bench import scaling
from afmp.training.checkpoint import load_checkpoint
from afmp.training.rundir import run_labels

BATCHES = (1, 64)
CSV_COLUMNS = [
    "run", "path", "model", "accuracy", "resolution", "tokens", "params", "matmul_gflops", "total_gflops", "gbytes",
    "ms_b1", "ms_b64", "peak_mb_b64", "oom_b64", "note",
]  # fmt: skip


UNITS = {"img_size": "image", "max_len": "sequence", scaling.POINTS: "set"}


def panels(rows: list[dict]) -> list[tuple[str, str]]:
    """The plot's (column, axis label) pairs, in the units of the runs' inputs."""
    units = {UNITS[scaling.size_field(r["model"])] for r in rows}
    unit = units.pop() if len(units) == 1 else "input"
    return [
        ("matmul_gflops", f"GFLOP per {unit} (matmul)"),
        ("ms_b1", "latency, batch 1 (ms)"),
        ("ms_b64", "latency, batch 64 (ms)"),
    ]


def read_accuracy(run: Path) -> float:
    path = run / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a training run: expected {path.name} (written by afmp train)")
    results = json.loads(path.read_text())
    if "test_accuracy" not in results:
        raise ValueError(
            f"{path} has no test_accuracy; expected the results.json of a finished afmp train run"
        )
    if results["test_accuracy"] is None:  # a trial of afmp tune: trained without reading the test split
        raise ValueError(
            f"{path} was never tested (an afmp tune trial?); expected a run trained with afmp train"
        )
    return float(results["test_accuracy"])


def bench_size(run: Path, spec: dict) -> int:
    """The size ``run`` (model.json's ``spec``) is measured at: its image side, its sequence
    length, or for a point-set model the largest set of its data (see the module's docstring)."""
    sized = scaling.size_field(spec["model"])
    if sized != scaling.POINTS:
        return spec["config"][sized]
    data = json.loads((run / "results.json").read_text()).get("data", {})
    if "tokens_min_mean_max" not in data:
        raise ValueError(
            f"{run}/results.json has no data.tokens_min_mean_max; expected a point-set run of afmp train"
        )
    return int(data["tokens_min_mean_max"][2])


def loader(run: Path, device, size: int):
    def make() -> scaling.BenchModel:
        module = load_checkpoint(run, device=device)
        return scaling.registered_bench_model(module, scaling.size_field(module.model_name), size)

    return make


def run_pareto(runs: list[str], cfg: scaling.BenchConfig, calib: dict, device, log=print) -> list[dict]:
    paths = [Path(r) for r in runs]
    accuracy = {p: read_accuracy(p) for p in paths}
    labels = run_labels(paths)
    measured = {}
    for batch in BATCHES:
        bcfg = dataclasses.replace(cfg, batch_size=batch, mode="infer")
        todo = []
        for p, label in zip(paths, labels):
            size = bench_size(p, json.loads((p / "model.json").read_text()))
            todo.append((scaling.blank_row(label, size, bcfg), loader(p, device, size)))
        measured[batch] = scaling.bench_one_size(todo, bcfg, calib, device, log)
    rows = []
    for p, label, one, many in zip(paths, labels, measured[1], measured[64]):
        rows.append(
            {
                "run": label,
                "path": str(p),
                "model": json.loads((p / "model.json").read_text())["model"],
                "accuracy": accuracy[p],
                **{
                    k: one[k]
                    for k in ("resolution", "tokens", "params", "matmul_gflops", "total_gflops", "gbytes")
                },
                "ms_b1": one["ms_median"],
                "ms_b64": many["ms_median"],
                "peak_mb_b64": many["peak_mb"],
                "oom_b64": many["oom"],
                "note": "; ".join(n for n in (one["note"], many["note"]) if n),
            }
        )
    return rows
