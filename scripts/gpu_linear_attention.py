"""One GPU session for the fused linear-attention kernel (afmp.ops.triton_linear_attention).

1. the kernel and Linear-ViT tests, compiled for the GPU (no interpreter);
2. forward+backward time in bf16 of the Triton kernel, the eager reference and SDPA softmax
   attention, for N = 64 ... 16384 (B=8, 6 heads, head dim 64), CUDA-event medians after
   warm-up (triton.testing.do_bench), with the kernel's error against the float32 reference;
3. one training step (bf16 autocast) of each *_cifar model, the linear ones with both backends.

    PYTHONPATH=src python3 scripts/gpu_linear_attention.py [--skip-tests]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
import triton.testing

import afmp
from afmp.ops import triton_linear_attention as T
from afmp.ops.linear_attention import linear_attention_reference


def run_tests() -> int:
    env = {**os.environ, "PYTHONPATH": "src"}
    env.pop("TRITON_INTERPRET", None)
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    mine = subprocess.run(
        [*pytest, "tests/test_linear_attention_kernel.py", "tests/test_linear_vit.py"], env=env, timeout=200
    )
    registry = subprocess.run([*pytest, "tests/test_models.py", "-k", "vit"], env=env, timeout=100)
    return mine.returncode or registry.returncode


def fwd_bwd(fn, q, k, v, do):
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)


def fwd(fn, q, k, v):
    def run():
        with torch.no_grad():
            fn(q, k, v)

    return run


def bench_ms(run) -> float:
    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


def kernel_table(batch=8, heads=6, dim=64) -> None:
    impls = {
        "triton": lambda q, k, v: T.linear_attention_triton(q, k, v),
        "reference": lambda q, k, v: linear_attention_reference(q, k, v),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    }
    print(f"\nB={batch} heads={heads} head_dim={dim} bf16, median ms (do_bench, CUDA events)")
    header = (
        f"{'N':>6} | {'fb triton':>9} {'fb ref':>8} {'fb sdpa':>8} | {'ref/tri':>7} {'sdpa/tri':>8} | "
        f"{'f triton':>8} {'f ref':>7} {'f sdpa':>7} | {'err out':>8} {'err dq':>8} {'err dk':>8} {'err dv':>8}"
    )
    print(header)
    print("-" * len(header))
    for n in (64, 256, 1024, 4096, 16384):
        g = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (
            torch.randn(
                batch, heads, n, dim, device="cuda", generator=g, dtype=torch.bfloat16
            ).requires_grad_()
            for _ in range(3)
        )
        do = torch.randn_like(q)
        fb = {name: bench_ms(fwd_bwd(fn, q, k, v, do)) for name, fn in impls.items()}
        f = {name: bench_ms(fwd(fn, q, k, v)) for name, fn in impls.items()}
        # Accuracy against the float32 reference on the same bf16 inputs, outputs and gradients.
        out = T.linear_attention_triton(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), do)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = linear_attention_reference(q32, k32, v32)
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
        errs = [
            float((a.detach().float() - b.detach()).norm() / b.detach().norm())
            for a, b in zip((out, *grads), (ref, *ref_grads))
        ]
        print(
            f"{n:>6} | {fb['triton']:>9.3f} {fb['reference']:>8.3f} {fb['sdpa']:>8.3f} | "
            f"{fb['reference'] / fb['triton']:>7.2f} {fb['sdpa'] / fb['triton']:>8.2f} | "
            f"{f['triton']:>8.3f} {f['reference']:>7.3f} {f['sdpa']:>7.3f} | "
            + " ".join(f"{e:>8.1e}" for e in errs)
        )


def warps_table(batch=8, heads=6, dim=64) -> None:
    default = T._num_warps
    print("\nnum_warps of the kernel at head dim 64 (fwd+bwd ms), default 8")
    for n in (1024, 16384):
        q, k, v = (
            torch.randn(batch, heads, n, dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
            for _ in range(3)
        )
        do = torch.randn_like(q)
        cells = []
        for warps in (4, 8):
            T._num_warps = lambda bd, w=warps: w
            cells.append(f"warps {warps}: {bench_ms(fwd_bwd(T.linear_attention_triton, q, k, v, do)):.3f}")
        T._num_warps = default
        print(f"N={n:>6}  " + "  ".join(cells))


def step_ms(model, batch: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = model.example_input(batch)
    y = torch.randint(0, model.num_classes, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return bench_ms(step)


def model_steps(batch=128) -> None:
    print(f"\ntraining step (fwd+bwd+AdamW), batch {batch}, bf16 autocast, median ms")
    for name, backends in (
        ("vit_baseline_cifar", [None]),
        ("ripple_vit_cifar", ["triton", "reference"]),
        ("hydra_vit_cifar", ["triton", "reference"]),
        ("hydra_bolya_vit_cifar", [None]),
    ):
        for backend in backends:
            model = afmp.create_model(name, **({"backend": backend} if backend else {})).cuda()
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(
                f"{name:24s} {backend or '-':10s} {params:6.2f}M params  {step_ms(model, batch):8.2f} ms/step"
            )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    status = 0 if args.skip_tests else run_tests()
    print(f"tests exit status: {status}", flush=True)
    for section in (kernel_table, warps_table, model_steps):
        try:
            section()
        except Exception as err:  # report and go on: one GPU session, every section counts
            print(f"{section.__name__} failed: {err!r}")
            status = status or 1
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
