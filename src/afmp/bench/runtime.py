"""`afmp bench runtime`: inference latency on the CPU in each runtime a deployment might use.

    afmp bench runtime                                  # AFMP-Tiny, batch 1
    afmp bench runtime --models afmp_tiny,ripple_vit_tiny --batch-size 1 --threads 1
    afmp bench runtime --runs runs/afmp_tiny-digits     # trained runs, as afmp export reads them

The runtimes: eager PyTorch, ``torch.compile`` (Inductor), and the model exported to ONNX
(``afmp.deploy.export``, checked against PyTorch first) in onnxruntime with as many threads
as torch has. They take turns, one call each per round, so that a change in the machine's
load reaches all of them alike; each row is a runtime's median, min and max over the
rounds, and its median as a fraction of eager's (``vs_eager``). Writes runtime.csv,
runtime.json and bench_config.json under --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from afmp.deploy.export import example, export_model, load_for_export, require_onnx
from afmp.measure.timing import time_step_ms
from afmp.registry import create_model
from afmp.training.rundir import run_labels
from afmp.utils.errors import UsageError, usage_errors
from afmp.utils.files import write_json, write_table
from afmp.utils.runtime import busy_warning, machine_state, use_threads

RUNTIMES = ("eager", "compiled", "onnxruntime")
COLUMNS = ["model", "runtime", "batch_size", "threads", "ms_median", "ms_min", "ms_max", "vs_eager"]
CPU = torch.device("cpu")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help="comma-separated presets, built untrained (default afmp_tiny)")
    p.add_argument("--runs", nargs="+", metavar="DIR", help="run directories of afmp train, instead")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--warmup", type=int, help="untimed calls per runtime (compilation happens here)")
    p.add_argument("--repeats", type=int, help="timed rounds")
    p.add_argument("--threads", type=int, help="torch's and onnxruntime's threads (default: torch's choice)")
    p.add_argument("--out", help="output directory (default bench/runtime)")


def models_to_time(models: str | None, runs: list[str] | None) -> list[tuple[str, torch.nn.Module]]:
    """(label, eval-mode CPU model) for each preset or run."""
    if models and runs:
        raise UsageError("give --models or --runs, not both")
    if runs:
        return [(label, load_for_export(run)[0]) for label, run in zip(run_labels(runs), runs)]
    names = (models or "afmp_tiny").split(",")
    return [(name, create_model(name).eval()) for name in names]


def onnx_session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def time_runtimes(label, model, batch_size, warmup, repeats, folder: Path, log=print) -> list[dict]:
    """One row per runtime for one model: see the module's docstring."""
    x = example(model, batch_size)
    path = folder / f"{label.replace('/', '_')}.onnx"
    report = export_model(model, "onnx", path, dynamic_batch=False, batch_size=batch_size)
    log(f"{label}: exported, onnxruntime matches PyTorch to {max(report.max_abs_diff.values()):.1e}")
    session = onnx_session(path, torch.get_num_threads())
    name, array = session.get_inputs()[0].name, x.numpy()
    compiled = torch.compile(model)
    calls = {
        "eager": lambda: model(x),
        "compiled": lambda: compiled(x),
        "onnxruntime": lambda: session.run(None, {name: array}),
    }
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {runtime: [] for runtime in calls}
    for _ in range(repeats):
        for runtime, call in calls.items():
            times[runtime].append(time_step_ms(call, CPU))
    eager = statistics.median(times["eager"])
    rows = []
    for runtime, ms in times.items():
        median = statistics.median(ms)
        rows.append(
            {
                "model": label,
                "runtime": runtime,
                "batch_size": batch_size,
                "threads": torch.get_num_threads(),
                "ms_median": median,
                "ms_min": min(ms),
                "ms_max": max(ms),
                "vs_eager": median / eager,
            }
        )
        log(
            f"  {runtime:12s} {median:8.3f} ms (min {min(ms):.3f}, max {max(ms):.3f})  {median / eager:.2f}x eager"
        )
    return rows


def main(args: argparse.Namespace) -> int:
    with usage_errors():
        batch_size = 1 if args.batch_size is None else args.batch_size
        warmup = 5 if args.warmup is None else args.warmup
        repeats = 30 if args.repeats is None else args.repeats
        if batch_size < 1 or warmup < 0 or repeats < 1:
            raise ValueError("--batch-size and --repeats must be >= 1, --warmup >= 0")
        use_threads(args.threads or 0)
        require_onnx()
        models = models_to_time(args.models, args.runs)
    out = Path(args.out or "bench/runtime")
    machine = machine_state()
    print(f"threads: {machine['threads']} of {machine['cpus']} CPUs, load average {machine['load_1min']:.1f}")
    warning = busy_warning(machine)
    if warning:
        print(warning)
    meta = {"study": "runtime", "batch_size": batch_size, "warmup": warmup, "repeats": repeats}
    write_json(
        out / "bench_config.json",
        {**meta, "machine": machine, "torch": torch.__version__, "command": sys.argv},
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, model in models:
            rows += time_runtimes(label, model, batch_size, warmup, repeats, Path(folder))
    write_table(out, "runtime", rows, COLUMNS)
    print(f"wrote {out}/runtime.csv, runtime.json, bench_config.json")
    return 0
