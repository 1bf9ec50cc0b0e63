"""The training step at the grids people train on, under each `--compile` mode: what auto's
CUDA row (afmp.training.compiling) rests on. Part of scripts/gpu_bench_all.sh:

    python3 scripts/gpu_train_modes.py --device cuda                 # every shape, off / on / graphs
    python3 scripts/gpu_train_modes.py --device cpu --modes off --steps 3   # a smoke test here

One full step as `afmp train` takes it (forward under autocast, cross-entropy plus the
sparsity loss, backward, AdamW step), batch 64, after warm-up steps that also compile; timed
with CUDA events (wall clock on the CPU), median over --steps. Prints one line per shape and
mode, the first step's time (compiling included) and each mode's time as a ratio of eager's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import afmp  # noqa: E402
from afmp.training.compiling import Choice, compiled  # noqa: E402
from afmp.utils.runtime import autocast  # noqa: E402

# name -> (preset, options): AFMP-Tiny at CIFAR's 4x4 and mnist5k's 7x7, 16x16, and AFMP-Small at 64².
SHAPES = {
    "tiny-4x4": ("afmp_tiny", dict(img_size=32, patch_size=8)),
    "tiny-7x7-mnist5k": ("afmp_tiny_dense", dict(img_size=28, patch_size=4, in_chans=1, d_model=64)),
    "tiny-16x16": ("afmp_tiny", dict(img_size=64, patch_size=4)),
    "small-64px": ("afmp_small", dict(img_size=64)),
}


def time_steps(preset, opts, mode: str, device, steps: int, warmup: int) -> tuple[float, float]:
    """(first step's seconds, median step's milliseconds) of one model's training step."""
    torch.manual_seed(0)
    module = afmp.create_model(preset, num_classes=10, **opts).to(device)
    model = compiled(module, Choice(mode, "as asked"))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    x = torch.randn(64, module.cfg.in_chans, module.cfg.img_size, module.cfg.img_size, device=device)
    y = torch.randint(0, 10, (64,), device=device)

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, True):
            logits, aux = model(x, return_aux=True)
            loss = F.cross_entropy(logits.float(), y) + aux["losses"]["sparsity"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed() -> float:
        if device.type != "cuda":
            started = time.perf_counter()
            step()
            return 1e3 * (time.perf_counter() - started)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    first = timed() / 1e3
    for _ in range(warmup):
        step()
    return first, statistics.median(timed() for _ in range(steps))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", default="off,on,graphs")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"training step, batch 64, by --compile mode, on {where}, torch {torch.__version__}")
    for shape in args.shapes.split(","):
        preset, opts = SHAPES[shape]
        eager_ms = None
        for mode in args.modes.split(","):
            first, ms = time_steps(preset, opts, mode, device, args.steps, args.warmup)
            eager_ms = ms if mode == "off" else eager_ms
            ratio = f"  {ms / eager_ms:.2f}x eager" if eager_ms else ""
            print(f"{shape:18s} {mode:7s} first step {first:6.1f} s  step {ms:8.2f} ms{ratio}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
