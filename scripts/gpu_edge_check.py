"""One GPU session's checks of the Triton edge kernels (issue 7), in one run.

    PYTHONPATH=src python3 scripts/gpu_edge_check.py --out DIR [--skip-tests] [--budget-s 380]

1. tests/test_edge_kernels.py on the GPU (compiled Triton, no interpreter);
2. a sweep of the kernels' launch knobs (tile budgets, warps, backward programs) at
   56x56, keeping the fastest for what follows;
3. the edge stage alone (afmp.ops.edge_bench), AFMP-Small shape: batch 64, D=512, bf16,
   grids 14, 28, 56, 80, backends reference and triton;
4. one AFMP-Small training step (bf16 autocast, AdamW) per backend, eager and
   torch.compile, at 224 and 896, with DeiT-Tiny (timm, SDPA, compiled) beside it.
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


def run_tests(out: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_edge_kernels.py"]
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONPATH="src")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=170)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, text = "timeout", f"{err.stdout or ''}{err.stderr or ''}\n(pytest stopped after 170 s)"
        text = text if isinstance(text, str) else text.decode()
    (out / "pytest.txt").write_text(text)
    log(text[-3000:])
    return {"rc": rc, "seconds": time.monotonic() - t0, "tail": text.strip().splitlines()[-1:]}


def sweep(budget) -> dict:
    """Pick the kernels' launch knobs at 56x56 (forward first, then backward); keep the best."""
    from afmp.ops import triton_edge as te
    from afmp.ops.edge_bench import edge_stage_bandwidth

    def measure():
        (r,) = edge_stage_bandwidth(64, 56, 512, torch.bfloat16, "cuda", ["triton"], repeats=5)
        return r["fwd_ms"], r["fwd_bwd_ms"] - r["fwd_ms"]

    log("\n## launch knobs, triton, 56x56, batch 64, D=512, bf16 (medians of 5)")
    fwd = {}
    for tile in (4096, 8192, 16384):
        for warps in (4, 8):
            if left(budget) < 250:
                break
            te.TILE_ELEMENTS, te.NUM_WARPS = tile, warps
            fwd[tile, warps] = measure()[0]
            log(f"forward  tile {tile:6} warps {warps}: {fwd[tile, warps]:.3f} ms")
    if fwd:
        te.TILE_ELEMENTS, te.NUM_WARPS = min(fwd, key=fwd.get)
    bwd = {}
    for tile in (4096, 8192):
        for programs in (2048, 16384, 65536):
            for warps in (4, 8):
                if left(budget) < 230:
                    break
                te.BWD_TILE_ELEMENTS, te.BWD_PROGRAMS, te.BWD_NUM_WARPS = tile, programs, warps
                bwd[tile, programs, warps] = measure()[1]
                log(
                    f"backward tile {tile:6} programs {programs:7} warps {warps}: {bwd[tile, programs, warps]:.3f} ms"
                )
    if bwd:
        te.BWD_TILE_ELEMENTS, te.BWD_PROGRAMS, te.BWD_NUM_WARPS = min(bwd, key=bwd.get)
    chosen = dict(
        TILE_ELEMENTS=te.TILE_ELEMENTS,
        NUM_WARPS=te.NUM_WARPS,
        BWD_TILE_ELEMENTS=te.BWD_TILE_ELEMENTS,
        BWD_PROGRAMS=te.BWD_PROGRAMS,
        BWD_NUM_WARPS=te.BWD_NUM_WARPS,
    )
    log(f"chosen: {chosen}")
    return dict(
        chosen=chosen,
        forward={str(k): v for k, v in fwd.items()},
        backward={str(k): v for k, v in bwd.items()},
    )


def edge_stage(budget) -> list[dict]:
    from afmp.ops.edge_bench import edge_stage_bandwidth

    rows = []
    log("\n## edge stage alone: batch 64, D=512, bf16, fwd+bwd (scores + gated aggregate), topk apart")
    log("grid   backend    fwd ms  fwd+bwd ms  topk ms  peak MB   GB/s  of copy")
    for grid in (14, 28, 56, 80):
        if left(budget) < 60:
            log("(budget spent: stopping the edge stage)")
            break
        for r in edge_stage_bandwidth(64, grid, 512, torch.bfloat16, "cuda", ["reference", "triton"]):
            rows.append(r)
            if "error" in r:
                log(f"{r['grid']:6} {r['backend']:9} {r['error']}")
                continue
            log(
                f"{r['grid']:6} {r['backend']:9} {r['fwd_ms']:7.3f} {r['fwd_bwd_ms']:10.3f} {r['topk_ms']:8.3f}"
                f" {r['peak_mb']:8.0f} {r['gb_per_s']:6.0f} {r['fraction_of_copy']:7.1%}"
            )
        pair = {r["backend"]: r for r in rows if r["grid"] == f"{grid}x{grid}" and "error" not in r}
        if len(pair) == 2:
            log(
                f"       reference / triton fwd+bwd: {pair['reference']['fwd_bwd_ms'] / pair['triton']['fwd_bwd_ms']:.2f}x"
            )
    log(f"copy bandwidth (measured): {rows[0]['copy_gb_per_s']:.0f} GB/s" if rows else "")

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
    parser.add_argument("--budget-s", type=float, default=380)
    parser.add_argument("--skip-tests", action="store_true")
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
        report["tests"] = run_tests(args.out)
    for section in (sweep, edge_stage, training):
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
