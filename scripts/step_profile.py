"""Where one AFMP training step goes at the grids people train on: ops, time per op family, allocations.

    OMP_NUM_THREADS=2 python3 scripts/step_profile.py                 # the table of docs/results.md
    OMP_NUM_THREADS=2 python3 scripts/step_profile.py --only tiny-7x7-d64 --backend packed

For each shape: aten ops dispatched (forward under no_grad, and a training step: forward,
cross-entropy plus the sparsity loss, backward), as afmp.measure.counting counts them (views
included) and as torch.profiler lists them (nested ops included: what the issue counted);
the step's median time over --repeats after warm-up; the share of the profiled step's CPU
time per op family (self time; "autograd + python" is the time of the autograd nodes and
the profiled step's wall time no aten op accounts for); and how many ops allocated memory.
One process, one thing at a time: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import afmp  # noqa: E402
from afmp.measure.counting import count  # noqa: E402

# name -> (preset, model options); the grid is img_size / patch_size tokens a side.
SHAPES = {
    "tiny-4x4-d128": ("afmp_tiny", dict(img_size=32, patch_size=8)),  # CIFAR at patch 8
    "tiny-7x7-d64": ("afmp_tiny_dense", dict(img_size=28, patch_size=4, in_chans=1, d_model=64)),  # mnist5k
    "tiny-7x7-d128": ("afmp_tiny_dense", dict(img_size=28, patch_size=4, in_chans=1, d_model=128)),
    "tiny-8x8-d64": ("afmp_tiny", dict(img_size=32, patch_size=4, d_model=64)),
    "tiny-8x8-d128": ("afmp_tiny", dict(img_size=32, patch_size=4)),
    "tiny-16x16-d64": ("afmp_tiny", dict(img_size=64, patch_size=4, d_model=64)),
    "tiny-16x16-d128": ("afmp_tiny", dict(img_size=64, patch_size=4)),
    "small-14x14-d512": ("afmp_small", dict()),
}
FAMILIES = {
    "matmul": ("mm", "addmm", "bmm", "baddbmm", "addmv", "mv", "dot", "convolution", "convolution_backward"),
    "gather/scatter": (
        "index_select",
        "index_add",
        "index_add_",
        "index_copy",
        "gather",
        "scatter",
        "scatter_",
        "scatter_add",
        "index",
        "index_put_",
        "_index_put_impl_",
        "embedding",
    ),  # fmt: skip
    "top-k": ("topk", "sort", "kthvalue"),
    "copy/alloc": (
        "copy_",
        "clone",
        "contiguous",
        "empty",
        "empty_like",
        "empty_strided",
        "zeros",
        "zeros_like",
        "new_zeros",
        "new_empty",
        "fill_",
        "zero_",
        "cat",
        "stack",
        "_to_copy",
        "resize_",
    ),  # fmt: skip
    "reduction": (
        "sum",
        "mean",
        "linalg_vector_norm",
        "norm",
        "amax",
        "max",
        "_log_softmax",
        "nll_loss_forward",
    ),
}


def family(name: str) -> str:
    if not name.startswith("aten::"):
        return "autograd + python"
    op = name.removeprefix("aten::")
    return next((f for f, ops in FAMILIES.items() if op in ops), "elementwise + other")


def profile_shape(label: str, batch: int, backend: str, warmup: int, repeats: int) -> dict:
    preset, opts = SHAPES[label]
    torch.manual_seed(0)
    model = afmp.create_model(preset, num_classes=10, backend=backend, **opts)
    x = model.example_input(batch_size=batch)
    y = torch.zeros(batch, dtype=torch.long)

    def step():
        model.zero_grad(set_to_none=True)
        logits, aux = model(x, return_aux=True)
        (F.cross_entropy(logits, y) + sum(aux["losses"].values())).backward()

    def forward():
        with torch.no_grad():
            model(x)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    row = dict(shape=label, step_ms=1000 * statistics.median(times))
    row["ops_forward"], row["ops_step"] = int(count(forward).ops), int(count(step).ops)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward()
    row["profiler_forward"] = sum(e.name.startswith("aten::") for e in prof.events())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        started = time.perf_counter()
        step()
        wall = time.perf_counter() - started
    events = prof.events()
    row["profiler_step"] = sum(e.name.startswith("aten::") for e in events)
    row["allocating_ops"] = sum(
        1 for e in events if e.name.startswith("aten::") and e.self_cpu_memory_usage > 0
    )
    shares = {}
    for e in events:
        shares[family(e.name)] = shares.get(family(e.name), 0.0) + e.self_cpu_time_total / 1e6
    shares["autograd + python"] = shares.get("autograd + python", 0.0) + max(0.0, wall - sum(shares.values()))
    total = sum(shares.values())
    row.update(
        {f: 100 * shares.get(f, 0.0) / total for f in [*FAMILIES, "elementwise + other", "autograd + python"]}
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated shapes (default: all): " + ", ".join(SHAPES))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    labels = args.only.split(",") if args.only else list(SHAPES)
    unknown = [s for s in labels if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, backend {args.backend}"
    )
    columns = ["ops_forward", "ops_step", "profiler_forward", "profiler_step", "step_ms", "allocating_ops",
               *FAMILIES, "elementwise + other", "autograd + python"]  # fmt: skip
    print("| shape | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for label in labels:
        small = label.startswith("small")  # seconds a step on a CPU: fewer repeats
        row = profile_shape(
            label, args.batch_size, args.backend, 1 if small else args.warmup, 2 if small else args.repeats
        )
        cells = [f"{row[c]:.0f}" if c in ("ops_forward", "ops_step", "profiler_forward", "profiler_step", "allocating_ops")
                 else f"{row[c]:.1f}" for c in columns]  # fmt: skip
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
