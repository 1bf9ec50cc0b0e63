"""One GPU session's checks of the stencil Triton edge kernels, in one run (about 6 minutes).

    PYTHONPATH=src python3 scripts/gpu_edge_check.py --out DIR [--skip-tests] [--budget-s 360]
        [--test-jobs 8] [--training]

1. tests/test_edge_kernels.py on the GPU (compiled Triton, no interpreter), split over
   --test-jobs pytest processes at once: compiling the kernels' variants is most of it;
2. a sweep of the kernels' launch knobs (forward: tokens per tile, D chunk, warps; then
   backward: the same and programs per launch) at 56x56, batch 64, D=512, bf16, keeping
   the fastest for what follows;
3. the edge stage alone (afmp.bench.edge): batch 64, D=512, bf16, delaunay grids 14,
   28, 56, 80, 128, backends reference, stencil (eager), stencil under torch.compile and
   triton, with the bytes the stage must move against the measured copy bandwidth;
4. only with --training (and a larger --budget-s): one AFMP-Small training step (bf16
   autocast, AdamW) per backend, eager and torch.compile, at 224 and 896, with DeiT-Tiny
   (timm, SDPA, compiled) beside it.
CUDA events after warm-up, medians, every ratio taken within this run. Sections stop
starting new work once the time budget is spent; everything printed also goes to
DIR/gpu_edge_check.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

START = time.monotonic()


def left(budget):
    return budget - (time.monotonic() - START)


def log(*args):
    print(*args, flush=True)


def run_tests(out: Path, jobs: int, timeout_s: float = 130) -> dict:
    """tests/test_edge_kernels.py, its tests dealt round-robin to ``jobs`` pytest processes
    run at once (each compiles the kernel variants its tests need; Triton's cache is shared)."""
    env = dict(os.environ, PYTHONPATH="src")
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    t0 = time.monotonic()
    listed = subprocess.run(
        [*pytest, "--collect-only", "tests/test_edge_kernels.py"], capture_output=True, text=True, env=env
    )
    ids = [line for line in listed.stdout.splitlines() if "::" in line]
    groups = [ids[i::jobs] for i in range(jobs) if ids[i::jobs]] or [["tests/test_edge_kernels.py"]]
    procs = [
        subprocess.Popen(
            [*pytest, *group], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        for group in groups
    ]
    texts, codes = [], []
    for proc in procs:
        try:
            text, _ = proc.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - t0)))
            codes.append(proc.returncode)
        except subprocess.TimeoutExpired:
            proc.kill()
            text = proc.communicate()[0] + f"\n(pytest stopped after {timeout_s:.0f} s)"
            codes.append("timeout")
        texts.append(text)
    text = "\n\n".join(texts)
    (out / "pytest.txt").write_text(text)
    failed = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    tails = [t.strip().splitlines()[-1] if t.strip() else "" for t in texts]
    log(text[-3000:] if failed or any(c != 0 for c in codes) else "\n".join(tails))
    return {
        "rc": codes,
        "tests": len(ids),
        "seconds": time.monotonic() - t0,
        "failed": failed,
        "tails": tails,
    }


FORWARD_KNOBS = ("BLOCK_T", "BLOCK_D", "NUM_WARPS")
BACKWARD_KNOBS = ("BWD_BLOCK_T", "BWD_BLOCK_D", "BWD_NUM_WARPS", "BWD_PROGRAMS")


def sweep(budget) -> dict:
    """Pick the kernels' launch knobs at 56x56 (forward first, then backward); keep the best.

    Every setting compiles the kernels anew (tiles and warps are compile-time constants),
    so the grid of settings is a short list, the defaults first.
    """
    from afmp.bench.edge import edge_stage_bandwidth
    from afmp.ops import triton_edge as te

    def measure():
        (r,) = edge_stage_bandwidth(64, 56, 512, torch.bfloat16, "cuda", ["triton"], repeats=5)
        return r["fwd_ms"], r["fwd_bwd_ms"] - r["fwd_ms"]

    def tried(knobs, settings, what, min_left, part):
        times = {}
        for setting in settings:
            if left(budget) < min_left:
                log(f"(budget: {what} sweep stopped)")
                break
            for knob, value in zip(knobs, setting):
                setattr(te, knob, value)
            try:
                times[setting] = measure()[part]
            except Exception as err:  # a setting that does not compile or run is skipped
                log(
                    f"{what} {dict(zip(knobs, setting))}: {type(err).__name__}: {str(err).splitlines()[0][:150]}"
                )
                continue
            log(f"{what} {dict(zip(knobs, setting))}: {times[setting]:.3f} ms")
        best = min(times, key=times.get) if times else tuple(getattr(te, k) for k in knobs)
        for knob, value in zip(knobs, best):
            setattr(te, knob, value)
        return times

    log("\n## launch knobs, triton, 56x56, batch 64, D=512, bf16 (medians of 5)")
    default = {k: getattr(te, k) for k in FORWARD_KNOBS + BACKWARD_KNOBS}
    log(f"defaults: {default}")
    # Each setting costs a compilation (seconds): the lists are short, the likeliest first.
    forward = [tuple(default[k] for k in FORWARD_KNOBS), (32, 64, 4), (16, 64, 4), (64, 64, 8), (32, 128, 8)]
    fwd = tried(FORWARD_KNOBS, dict.fromkeys(forward), "forward ", 190, 0)
    programs = default["BWD_PROGRAMS"]
    backward = [tuple(default[k] for k in BACKWARD_KNOBS)] + [
        (bt, bd, warps, programs)
        for bt, bd, warps in ((8, 64, 4), (16, 64, 4), (16, 32, 4), (32, 64, 8), (16, 128, 8))
    ]
    bwd = tried(BACKWARD_KNOBS, dict.fromkeys(backward), "backward", 130, 1)
    # Fewer programs, each looping over several token tiles, with the best tiles found.
    fewer = [(*(getattr(te, k) for k in BACKWARD_KNOBS[:3]), n) for n in (2048, 65536) if n != programs]
    bwd.update(tried(BACKWARD_KNOBS, fewer, "backward", 120, 1))
    for knob, value in zip(BACKWARD_KNOBS, min(bwd, key=bwd.get) if bwd else ()):
        setattr(te, knob, value)
    chosen = {k: getattr(te, k) for k in FORWARD_KNOBS + BACKWARD_KNOBS}
    log(f"chosen: {chosen}")
    return dict(
        defaults=default,
        chosen=chosen,
        forward={str(dict(zip(FORWARD_KNOBS, k))): v for k, v in fwd.items()},
        backward={str(dict(zip(BACKWARD_KNOBS, k))): v for k, v in bwd.items()},
    )


GRIDS = (14, 28, 56, 80, 128)
BACKENDS = ("reference", "stencil", "stencil_compiled", "triton")


def register_compiled_stencil():
    """The stencil backend under torch.compile (inductor), as a backend the edge study can name."""
    from afmp.ops import EdgeBackend, register_edge_backend, stencil_edge

    register_edge_backend(
        EdgeBackend(
            name="stencil_compiled",
            edge_scores=torch.compile(stencil_edge.edge_scores, dynamic=False),
            gated_aggregate=torch.compile(stencil_edge.gated_aggregate, dynamic=False),
            input_why_not=stencil_edge.scaffold_why_not,
        )
    )
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(GRIDS))


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def edge_stage(budget) -> list[dict]:
    """Every grid with the eager backends first, then the compiled stencil, 56x56 first:
    compiling it takes tens of seconds per grid, so it gets the time that is left."""
    from afmp.bench.edge import edge_stage_bandwidth

    register_compiled_stencil()
    rows = []

    def run(grid, name, min_left):
        if left(budget) < min_left:
            log(f"{f'{grid}x{grid}':9} {name:16} skipped (budget)")
            return
        breaks = graph_breaks()
        t0 = time.monotonic()
        try:
            (r,) = edge_stage_bandwidth(64, grid, 512, torch.bfloat16, "cuda", [name])
        except Exception as err:  # report and go on: one failure must not hide the rest
            r = dict(grid=f"{grid}x{grid}", backend=name, error=f"{type(err).__name__}: {str(err)[:200]}")
            torch.cuda.empty_cache()
        r["wall_s"] = time.monotonic() - t0
        if name == "stencil_compiled":
            r["graph_breaks"] = graph_breaks() - breaks
        rows.append(r)
        if "error" in r:
            log(f"{r['grid']:9} {name:16} {r['error'].splitlines()[0]}")
            return
        log(
            f"{r['grid']:9} {name:16} {r['fwd_ms']:7.3f} {r['fwd_bwd_ms']:10.3f} {r['topk_ms']:8.3f}"
            f" {r['peak_mb']:8.0f} {r['gb_per_s']:6.0f} {r['fraction_of_copy']:7.1%}  ({r['wall_s']:.0f} s"
            + (f", {r['graph_breaks']} graph breaks)" if "graph_breaks" in r else ")")
        )

    log("\n## edge stage alone: batch 64, D=512, bf16, fwd+bwd (scores + gated aggregate), topk apart")
    log("grid     backend            fwd ms  fwd+bwd ms  topk ms  peak MB   GB/s  of copy")
    for grid in GRIDS:
        for name in BACKENDS:
            if name != "stencil_compiled":
                run(grid, name, 15)
    for grid in sorted(GRIDS, key=lambda g: abs(g - 56)):
        run(grid, "stencil_compiled", 45)

    log("\nfwd+bwd time / triton's (same run):")
    for grid in GRIDS:
        ok = {r["backend"]: r for r in rows if r["grid"] == f"{grid}x{grid}" and "error" not in r}
        if "triton" in ok:
            ratios = ", ".join(
                f"{name} {ok[name]['fwd_bwd_ms'] / ok['triton']['fwd_bwd_ms']:.2f}x"
                for name in BACKENDS
                if name in ok and name != "triton"
            )
            log(f"{f'{grid}x{grid}':9} {ratios}")
    copy = next((r["copy_gb_per_s"] for r in rows if "copy_gb_per_s" in r), None)
    log(f"copy bandwidth (measured): {copy:.0f} GB/s" if copy else "")
    return rows


def train_step_ms(make_model, size, compiled, batch=64, repeats=10):
    device = torch.device("cuda")
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    model = make_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    run = torch.compile(model, dynamic=False) if compiled else model
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(x)
            logits, aux = out if isinstance(out, tuple) else (out, {})
            loss = F.cross_entropy(logits.float(), y) + aux.get("sparsity_loss", 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() / 2**30
    return statistics.median(times), peak


def training(budget) -> list[dict]:
    import timm

    from afmp.registry import create_model

    class AuxAFMP(torch.nn.Module):  # forward returns (logits, aux) so the loss has the regulariser
        def __init__(self, backend, size):
            super().__init__()
            self.inner = create_model("afmp_small", backend=backend, img_size=size)

        def forward(self, x):
            return self.inner(x, return_aux=True)

    models = {
        "afmp_small/reference": lambda size: lambda: AuxAFMP("reference", size),
        "afmp_small/triton": lambda size: lambda: AuxAFMP("triton", size),
        "deit_tiny_sdpa": lambda size: (
            lambda: timm.create_model("deit_tiny_patch16_224", img_size=size, num_classes=100)
        ),
    }
    # The figures that matter first (the kernels' step against DeiT's), then the rest as time allows.
    plan = [
        (224, "afmp_small/reference", False),
        (224, "afmp_small/triton", False),
        (224, "afmp_small/triton", True),
        (224, "deit_tiny_sdpa", True),
        (896, "afmp_small/triton", False),
        (896, "afmp_small/triton", True),
        (896, "deit_tiny_sdpa", True),
        (224, "afmp_small/reference", True),
        (896, "afmp_small/reference", True),
    ]
    rows = []
    log("\n## training step, batch 64, bf16 autocast, AdamW (median of 10 after 3 warm-up)")
    for size, name, compiled in plan:
        if left(budget) < (90 if compiled else 25):
            log(f"{size:5} {name:22} compile={compiled}: skipped (budget)")
            continue
        row = dict(size=size, model=name, compile=compiled)
        t0 = time.monotonic()
        try:
            row["ms"], row["peak_gb"] = train_step_ms(models[name](size), size, compiled)
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as err:  # report and go on: one failure must not hide the rest
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        row["wall_s"] = time.monotonic() - t0
        rows.append(row)
        figs = f"{row['ms']:8.2f} ms {row['peak_gb']:6.2f} GB" if "ms" in row else row["error"]
        log(f"{size:5} {name:22} compile={str(compiled):5} {figs}  ({row['wall_s']:.0f} s)")
    log("\nratios (same run):")
    by = {(r["size"], r["model"], r["compile"]): r for r in rows if "ms" in r}
    for size in (224, 896):
        for compiled in (False, True):
            ref, tri = (
                by.get((size, "afmp_small/reference", compiled)),
                by.get((size, "afmp_small/triton", compiled)),
            )
            deit = by.get((size, "deit_tiny_sdpa", True))
            if ref and tri:
                log(
                    f"{size} compile={compiled}: reference/triton time {ref['ms'] / tri['ms']:.2f}x, memory {ref['peak_gb'] / tri['peak_gb']:.2f}x"
                )
            if tri and deit:
                log(
                    f"{size} compile={compiled}: triton/deit_tiny_compiled time {tri['ms'] / deit['ms']:.2f}x, memory {tri['peak_gb'] / deit['peak_gb']:.2f}x"
                )
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--budget-s", type=float, default=360)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--test-jobs", type=int, default=8)
    parser.add_argument("--training", action="store_true", help="also time AFMP-Small training steps")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton

        report["triton"] = triton.__version__
        log(f"triton {triton.__version__}")
    except ImportError:
        pass
    if not args.skip_tests:
        report["tests"] = run_tests(args.out, args.test_jobs)
    for section in (sweep, edge_stage, *((training,) if args.training else ())):
        try:
            report[section.__name__] = section(args.budget_s)
        except Exception as err:
            import traceback

            traceback.print_exc()
            report[section.__name__] = f"failed: {err!r}"
        (args.out / "gpu_edge_check.json").write_text(json.dumps(report, indent=1, default=str))
    log(f"total {time.monotonic() - START:.0f} s")


if __name__ == "__main__":
    main()
