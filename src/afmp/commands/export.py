"""`afmp export`: a trained run as an ONNX file or a pt2 program, checked against PyTorch.

    afmp export --checkpoint runs/afmp_tiny-digits --format onnx --dynamic-batch --out afmp_tiny.onnx
    afmp export --checkpoint runs/afmp_tiny-digits --format pt2 --out afmp_tiny.pt2

The file is kept only when the exported model's logits match PyTorch's within --atol on the
inputs it was checked on (afmp.deploy.export); the largest difference is printed.
"""

from __future__ import annotations

import argparse

from afmp.deploy.export import ATOL, FORMATS, export_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory written by afmp train")
    p.add_argument(
        "--format", required=True, choices=list(FORMATS), help="onnx (onnxruntime and others) or pt2"
    )
    p.add_argument("--out", required=True, help="the file to write (.onnx or .pt2)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (else --batch-size only)")
    p.add_argument("--batch-size", type=int, default=1, help="the fixed batch size without --dynamic-batch")
    p.add_argument("--opset", type=int, help="ONNX operator set version (default: torch.onnx's)")
    p.add_argument(
        "--atol", type=float, default=ATOL, help=f"largest difference from PyTorch allowed (default {ATOL:g})"
    )


def main(args: argparse.Namespace) -> int:
    report = export_run(
        args.checkpoint,
        args.format,
        args.out,
        dynamic_batch=args.dynamic_batch,
        batch_size=args.batch_size,
        opset=args.opset,
        atol=args.atol,
    )
    for note in report.notes:
        print(f"note: {note}")
    runtime = "onnxruntime" if report.format == "onnx" else "the loaded pt2 program"
    dynamic = f", dynamic {' and '.join(report.dynamic)}" if report.dynamic else ""
    diffs = ", ".join(f"{diff:.2e} at {shape}" for shape, diff in report.max_abs_diff.items())
    print(f"{runtime} against PyTorch, max |difference| of the logits: {diffs}")
    print(
        f"wrote {report.path} ({report.model}, {report.format}, traced on {'x'.join(map(str, report.input_shape))}{dynamic})"
    )
    return 0
