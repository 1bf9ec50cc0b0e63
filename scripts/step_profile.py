"""Where one AFMP training step goes at the grids people train on: ops, time per op family, allocations.

    OMP_NUM_THREADS=2 python3 scripts/step_profile.py                 # the table of docs/results.md
    OMP_NUM_THREADS=2 python3 scripts/step_profile.py --only tiny-7x7-d64 --backend packed
    OMP_NUM_THREADS=1 python3 scripts/step_profile.py --only tiny-7x7-d64 --compile --repeats 1

For each shape: aten ops dispatched (forward under no_grad, and a training step: forward,
cross-entropy plus the sparsity loss, backward), as afmp.measure.counting counts them (views
included) and as torch.profiler lists them (nested ops included: what the issue counted);
the step's median time over --repeats after warm-up; the share of the profiled step's CPU
time per op family (self time; "autograd + python" is the time of the autograd nodes and
the profiled step's wall time no aten op accounts for); and how many ops allocated memory.
One process, one thing at a time: run it alone on the machine.

--compile profiles the model under torch.compile (Inductor; ``auto`` then picks the
stencil). Its fused loops are not aten ops, so the profiler's columns count the aten ops
the compiled step still dispatches (matrix products, mostly) and the "kernels" columns the
calls of the loops Inductor generated (recorded with Inductor's cpp.enable_kernel_profile;
their time is the "compiled kernels" share): aten ops plus kernels is what a compiled step
launches. The dispatched columns, which count by tracing eager ops, are left out.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config
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

OTHERS = ("elementwise + other", "compiled kernels", "autograd + python")


def is_kernel(name: str) -> bool:
    """A loop Inductor generated (its C++ kernels are named cpp_fused_..., per graph)."""
    return "cpp_fused_" in name


def family(name: str) -> str:
    if is_kernel(name):
        return "compiled kernels"
    if not name.startswith("aten::"):
        return "autograd + python"
    op = name.removeprefix("aten::")
    return next((f for f, ops in FAMILIES.items() if op in ops), "elementwise + other")


def profile_shape(
    label: str, batch: int, backend: str, warmup: int, repeats: int, compile: bool = False
) -> dict:
    preset, opts = SHAPES[label]
    torch.manual_seed(0)
    module = afmp.create_model(preset, num_classes=10, backend=backend, **opts)
    x = module.example_input(batch_size=batch)
    if compile:  # the generated loops show in the profiler as events of their own
        torch._inductor.config.cpp.enable_kernel_profile = True
    model = torch.compile(module) if compile else module
    y = torch.zeros(batch, dtype=torch.long)

    def step():
        module.zero_grad(set_to_none=True)
        logits, aux = model(x, return_aux=True)
        (F.cross_entropy(logits, y) + sum(aux["losses"].values())).backward()

    def forward():
        with torch.no_grad():
            model(x)

    row = dict(shape=label)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    row["step_ms"] = 1000 * statistics.median(times)
    forward()  # compiled, its no-grad graph is compiled on this first call: not in the profile
    if compile:
        row["ops_forward"] = row["ops_step"] = float("nan")
    else:
        row["ops_forward"], row["ops_step"] = int(count(forward).ops), int(count(step).ops)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward()
    row["profiler_forward"] = sum(e.name.startswith("aten::") for e in prof.events())
    row["kernels_forward"] = sum(is_kernel(e.name) for e in prof.events())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        started = time.perf_counter()
        step()
        wall = time.perf_counter() - started
    events = prof.events()
    row["profiler_step"] = sum(e.name.startswith("aten::") for e in events)
    row["kernels_step"] = sum(is_kernel(e.name) for e in events)
    row["allocating_ops"] = sum(
        1 for e in events if e.name.startswith("aten::") and e.self_cpu_memory_usage > 0
    )
    shares = {}
    for e in events:
        shares[family(e.name)] = shares.get(family(e.name), 0.0) + e.self_cpu_time_total / 1e6
    shares["autograd + python"] = shares.get("autograd + python", 0.0) + max(0.0, wall - sum(shares.values()))
    total = sum(shares.values())
    row.update({f: 100 * shares.get(f, 0.0) / total for f in [*FAMILIES, *OTHERS]})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated shapes (default: all): " + ", ".join(SHAPES))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="profile the model under torch.compile")
    args = parser.parse_args()
    labels = args.only.split(",") if args.only else list(SHAPES)
    unknown = [s for s in labels if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, backend {args.backend}"
        + (", compiled" if args.compile else ", eager")
    )
    counts = (
        "ops_forward",
        "ops_step",
        "profiler_forward",
        "profiler_step",
        "kernels_forward",
        "kernels_step",
        "allocating_ops",
    )
    columns = [*counts[:6], "step_ms", "allocating_ops",
               *FAMILIES, *OTHERS]  # fmt: skip
    print("| shape | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for label in labels:
        small = label.startswith("small")  # seconds a step on a CPU: fewer repeats
        row = profile_shape(
            label,
            args.batch_size,
            args.backend,
            1 if small else args.warmup,
            2 if small else args.repeats,
            args.compile,
        )
        cells = [
            ("–" if math.isnan(row[c]) else f"{row[c]:.0f}") if c in counts else f"{row[c]:.1f}"
            for c in columns
        ]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
