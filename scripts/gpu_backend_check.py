"""Every edge backend against the reference on a device, float32 and bfloat16, forward and every
gradient, on 1x13, 7x9 and 64x64 grids (afmp.ops.crosscheck). The first step of a GPU run:

    python3 scripts/gpu_backend_check.py --device cuda

Prints one line per backend, grid and dtype; exits 1 with the differing backends named when
one is off the reference, so that nothing after it in scripts/gpu_bench_all.sh runs on it.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from afmp.ops.crosscheck import GRIDS, crosscheck  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float64"
    )
    parser.add_argument("--grids", default=",".join(f"{h}x{w}" for h, w in GRIDS), help="e.g. 1x13,7x9,64x64")
    parser.add_argument("--backends", help="comma-separated (default: every one but the reference)")
    args = parser.parse_args()
    grids = [tuple(int(v) for v in g.split("x")) for g in args.grids.split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(
        f"edge backends against the reference on {where}, torch {torch.__version__}, commit {commit or '?'}"
    )
    found = crosscheck(args.device, dtypes, grids, args.backends.split(",") if args.backends else None)
    for mismatch in found:
        print(f"FAILED: {mismatch}", file=sys.stderr)
    if found:
        print("stop: do not time or record a backend that computes something else", file=sys.stderr)
        return 1
    print("every backend agrees with the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
