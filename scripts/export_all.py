"""Every image and text preset of the registry, at full size, exported to ONNX and pt2 with a
dynamic batch and checked against PyTorch (afmp.deploy.export): what tests/test_export.py does
for one small preset per family, for all of them. Prints one row per preset and format; exits 1
if any fails or differs by more than the tolerance.

    python3 scripts/export_all.py [--formats onnx,pt2] [--models afmp_tiny,diffusion_text]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import afmp
from afmp.deploy.export import ATOL, FORMATS, NOT_EXPORTABLE, export_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--models", help="comma-separated presets (default: every one)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else afmp.list_models()
    failed, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            if name in NOT_EXPORTABLE:
                print(f"{name:28s} not exportable: {NOT_EXPORTABLE[name]}")
                continue
            torch.manual_seed(0)
            model = afmp.create_model(name).eval()
            for fmt in args.formats.split(","):
                t0 = time.perf_counter()
                try:
                    report = export_model(
                        model, fmt, Path(folder) / f"{name}{FORMATS[fmt]}", dynamic_batch=True
                    )
                    diffs = "  ".join(f"{shape}: {d:.1e}" for shape, d in report.max_abs_diff.items())
                    outcome = f"max |diff| {diffs}"
                except Exception as err:  # noqa: BLE001 (a row per preset, whatever failed)
                    failed.append(f"{name} {fmt}")
                    outcome = f"FAILED {type(err).__name__}: {' '.join(str(err).split())[:200]}"
                print(f"{name:28s} {fmt:4s} {time.perf_counter() - t0:6.1f}s  {outcome}", flush=True)
    print(
        f"{len(names)} presets in {time.perf_counter() - started:.0f}s; tolerance {ATOL:g}; failed: {failed or 'none'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
