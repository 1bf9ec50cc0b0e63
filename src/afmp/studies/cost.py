"""What a study will cost, for ``afmp reproduce --dry-run``: every run, and each model's
training step measured here at the study's batch size (median of 5 after 2 warm-up steps:
time, peak memory and counted FLOPs), multiplied out over the runs, epochs and steps.
"""

from __future__ import annotations

import json
import math

from afmp.utils.errors import UsageError

# Train-set images and what a model is fitted to, per data set (for --dry-run, without the files).
DATA_SHAPES = {  # name -> (training images before the validation split, image side, channels, classes)
    "cifar10": (50_000, 32, 3, 10),
    "cifar100": (50_000, 32, 3, 100),
    "tiny-imagenet": (100_000, 64, 3, 200),
    "mnist5k": (4_000, 28, 1, 10),  # its split: 3,500 train + 500 val; 1,000 test apart
    "digits": (1_617, 8, 1, 10),
    # A point-set data set: its largest set's points (docs/results.md), features per point.
    "mnist5k-superpixels": (4_000, 83, 3, 10),
}
POINT_SETS = {"mnist5k-superpixels": 2}  # the point-set data sets, and their positions' dimensions


def step_cost(cfg, device) -> dict:
    """One training step of ``cfg``'s model at its batch size on ``device``: ms, peak MB, GFLOP."""
    import torch

    from afmp.bench import scaling
    from afmp.measure import roofline
    from afmp.registry import create_model, model_args_for_data

    if cfg.dataset not in DATA_SHAPES:
        raise UsageError(f"--dry-run knows the shapes of {', '.join(DATA_SHAPES)}, not {cfg.dataset!r}")
    _, side, chans, classes = DATA_SHAPES[cfg.dataset]
    sized, data_args = "img_size", {"img_size": side, "in_chans": chans, "num_classes": classes}
    if cfg.dataset in POINT_SETS:  # side: points per set; chans: features per point
        sized = scaling.POINTS
        data_args = {"in_features": chans, "pos_dim": POINT_SETS[cfg.dataset], "num_classes": classes}
    bcfg = scaling.BenchConfig(
        models=[cfg.model],
        resolutions=[side],
        batch_size=cfg.batch_size,
        device=str(device),
        warmup=2,
        repeats=5,
    )
    calib = roofline.load_or_calibrate(device, torch.float32)

    def make():
        module = create_model(cfg.model, **model_args_for_data(cfg.model, data_args, cfg.model_opts)).to(
            device
        )
        return scaling.registered_bench_model(module, sized, side)

    (row,) = scaling.bench_one_size(
        [(scaling.blank_row(cfg.model, side, bcfg), make)], bcfg, calib, device, lambda *a, **k: None
    )
    return {
        "ms": row["ms_median"],
        "peak_mb": row["peak_mb"],
        "gflops": row["total_gflops"],
        "params": row["params"],
    }


def dry_run(name: str, study: dict, runs, args) -> list[dict]:
    """Print every run and its cost; returns one row per distinct model configuration."""
    import torch

    from afmp.utils.runtime import resolve_device

    if study["kind"] == "scaling":
        bench = study["bench"]
        cells = len(bench["models"]) * len(bench["resolutions"])
        steps = bench.get("warmup", 1) + bench.get("repeats", 3)
        print(
            f"{name}: {len(bench['models'])} models x {len(bench['resolutions'])} sizes = {cells} cells, "
            f"{steps} steps each plus counting at batch 2 and 3, on {bench.get('device', 'cpu')}. "
            "Its cost is what it measures: docs/results.md has the last GPU run's step times."
        )
        return []
    device = resolve_device(args.device or "auto")
    rate = args.tflops * 1e12 if args.tflops else None
    print(
        f"{name}: {len(runs)} training runs ({study['seeds']} seed(s)); each model's training step measured on {device}:"
    )
    header = (
        "| model | runs | epochs | steps / run | params | GFLOP / step | ms / step | peak MB | hours here |"
    )
    print(header + (f" hours at {args.tflops:g} TFLOP/s |" if rate else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if rate else ""))
    seen: dict[str, dict] = {}
    for label, _, cfg in runs:
        key = json.dumps([cfg.model, cfg.model_opts, cfg.batch_size, cfg.dataset], sort_keys=True)
        if key not in seen:
            seen[key] = {"label": label, "cfg": cfg, "runs": 0, **step_cost(cfg, device)}
        seen[key]["runs"] += 1
    rows = list(seen.values())
    total_here = total_rate = 0.0
    for r in rows:
        cfg = r["cfg"]
        train_images = DATA_SHAPES[cfg.dataset][0] * (1 - cfg.val_fraction)
        steps = math.ceil(train_images / cfg.batch_size)
        # Validation and test passes: forward only, about a third of a training step per image.
        per_run = cfg.epochs * steps * (1 + cfg.val_fraction / (1 - cfg.val_fraction) / 3)
        r.update(steps=steps, hours=r["runs"] * per_run * r["ms"] / 3.6e6)
        total_here += r["hours"]
        line = (
            f"| {r['label']} | {r['runs']} | {cfg.epochs} | {steps} | {r['params'] / 1e6:.2f}M | {r['gflops']:.2f} "
            f"| {r['ms']:.1f} | {r['peak_mb']:.0f} | {r['hours']:.2f} |"
        )
        if rate:
            r["hours_at_rate"] = r["runs"] * per_run * r["gflops"] * 1e9 / rate / 3600
            total_rate += r["hours_at_rate"]
            line += f" {r['hours_at_rate']:.3f} |"
        print(line)
    print(
        f"total: {total_here:.1f} hours on {device}"
        + (f", {total_rate:.2f} hours at {args.tflops:g} TFLOP/s" if rate else "")
    )
    if device.type == "cpu" and torch.cuda.is_available() is False:
        print(
            "(measured on the CPU; run --dry-run on the GPU for GPU-hours, or pass --tflops R for the time "
            "the counted FLOPs take at R TFLOP/s: a lower bound, small models rarely reach it)"
        )
    return rows
