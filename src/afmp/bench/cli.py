"""`afmp bench [scaling|pareto|edge|runtime|sets]`: measure what models cost, and write the numbers and plots.

    afmp bench                                   # the scaling study, a default set for this device
    afmp bench scaling --models afmp_small,deit_tiny_sdpa --resolutions 64,224,448 --batch-size 64 \\
        --dtype bfloat16 --device cuda --out bench/paper    # (`afmp bench --models ...` is the same)
    afmp bench pareto --runs runs/a runs/b --out bench/pareto
    afmp bench edge --resolutions 224,448        # AFMP's edge stage alone, per backend
    afmp bench runtime --models afmp_tiny        # batch-1 CPU latency: eager, compiled, onnxruntime
    afmp bench sets --points 1000,4000,16000 --layouts uniform,clustered --dims 2,3   # point sets

Without --models/--resolutions the defaults depend on the device: on the CPU a set
that finishes in about two minutes on two cores; on a GPU the paper's comparison
(AFMP-Small against DeiT-Tiny fused, unfused and neighbourhood; 64^2 ... 1280^2,
batch 64, bf16). The out directory gets scaling.csv, scaling.json, bench_config.json
and PNGs (pareto: pareto.csv, pareto.json, bench_config.json, pareto.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from afmp.bench import pareto, plots, runtime, scaling, sets
from afmp.measure import roofline, timing
from afmp.utils.errors import usage_errors
from afmp.utils.files import write_json, write_table
from afmp.utils.options import parse_key_values
from afmp.utils.runtime import busy_warning, machine_state, use_threads

DEFAULTS = {
    "cpu": dict(
        # Not vit_natten_flex: FlexAttention has no backward on the CPU, so its train row fails.
        models=["afmp_small", "deit_tiny_sdpa", "deit_tiny_unfused"],
        resolutions=[64, 128, 192],
        batch_size=4,
        dtype="float32",
        warmup=1,
        repeats=3,
        num_classes=1000,
    ),
    "cuda": dict(
        models=[
            "afmp_small",
            "afmp_small@compile=true",
            "deit_tiny_sdpa",
            "deit_tiny_sdpa@compile=true",
            "deit_tiny_unfused",
            "vit_natten_flex",
        ],
        resolutions=[64, 128, 224, 448, 896, 1280],
        batch_size=64,
        dtype="bfloat16",
        warmup=3,
        repeats=10,
        num_classes=1000,
    ),
}


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def common_options(p: argparse.ArgumentParser) -> None:
    """What every study takes: where it runs, in what precision, how long it times."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", choices=list(scaling.DTYPES))
    p.add_argument("--warmup", type=int, help="untimed steps per model (compilation happens here)")
    p.add_argument("--repeats", type=int, help="timed steps per model")
    p.add_argument("--recalibrate", action="store_true", help="measure the roofline again (else cached)")
    p.add_argument("--out", help="output directory (default bench/<study>)")
    p.add_argument(
        "--threads", type=int, default=0, help="torch's CPU threads (default 0: torch's own choice)"
    )
    p.add_argument(
        "--system-allocator",
        action="store_true",
        help="CPU: leave glibc's malloc as it is, unmapping freed large blocks and mapping them again "
        "each step (default: freed memory kept for reuse, as PyTorch's CUDA allocator keeps it)",
    )


def model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-opt", action="append", metavar="KEY=VALUE", help="Config field for every model that has it"
    )


def size_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolutions", type=int_list, help="image sizes, e.g. 64,224,448")
    p.add_argument("--batch-size", type=int)


def scaling_options(p: argparse.ArgumentParser) -> None:
    common_options(p)
    model_options(p)
    size_options(p)
    p.add_argument("--models", help="comma-separated specs, e.g. afmp_small@backend=reference,deit_tiny_sdpa")
    p.add_argument("--seq-lengths", type=int_list, help="sizes of sequence models (default: --resolutions)")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument(
        "--precision",
        choices=["autocast", "cast"],
        default="autocast",
        help="autocast (fp32 weights, the training recipe) or cast (model and input in --dtype)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile every model (or per model: @compile=true)"
    )
    p.add_argument("--num-classes", type=int, help="classes of every model's head (default 1000)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    # `afmp bench [OPTIONS]` is the scaling study, so the parent parser takes its options too.
    # A study's own parser leaves unset options alone (SUPPRESS), so that the parent's
    # defaults fill them and an option given before the study's name is kept.
    scaling_options(p)
    sub = p.add_subparsers(dest="study", metavar="STUDY")
    studies = {
        "scaling": (
            "time, memory, FLOPs and bytes of --models as --resolutions grow (the default)",
            scaling_options,
        ),
        "pareto": ("test accuracy of trained runs against their FLOPs and latency at batch 1 and 64", None),
        "edge": ("AFMP's per-edge stage alone, per backend: bytes moved against the copy bandwidth", None),
        "runtime": ("CPU latency of eager PyTorch, torch.compile and the ONNX export in onnxruntime", None),
        "sets": (
            "point-set models on synthetic sets as the points grow, and the scaffold's construction",
            None,
        ),
    }
    parsers = {
        name: sub.add_parser(name, help=text, description=text, argument_default=argparse.SUPPRESS)
        for name, (text, _) in studies.items()
    }
    scaling_options(parsers["scaling"])
    parsers["pareto"].add_argument(
        "--runs", nargs="+", metavar="DIR", required=True, help="run directories of afmp train"
    )
    common_options(parsers["pareto"])
    common_options(parsers["edge"])
    model_options(parsers["edge"])
    size_options(parsers["edge"])
    runtime.add_arguments(parsers["runtime"])
    common_options(parsers["sets"])
    model_options(parsers["sets"])
    sets.add_arguments(parsers["sets"])
    for parser in parsers.values():  # argument_default does not reach options given a default
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    p.set_defaults(study="scaling", runs=None, layouts=None, dims=None, graph=None)  # the last three: sets'


def config_from_args(args: argparse.Namespace) -> scaling.BenchConfig:
    from afmp.utils.runtime import resolve_device

    device = resolve_device(args.device)
    defaults = sets.DEFAULTS if args.study == "sets" else DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    pick = lambda value, key: defaults[key] if value is None else value  # noqa: E731
    return scaling.BenchConfig(
        models=args.models.split(",") if args.models else defaults["models"],
        resolutions=pick(args.resolutions, "resolutions"),
        seq_lengths=args.seq_lengths,
        batch_size=pick(args.batch_size, "batch_size"),
        mode=args.mode,
        dtype=pick(args.dtype, "dtype"),
        precision=args.precision,
        device=str(device),
        compile=args.compile,
        warmup=pick(args.warmup, "warmup"),
        repeats=pick(args.repeats, "repeats"),
        num_classes=pick(args.num_classes, "num_classes"),
        model_opts=parse_key_values(args.model_opt, flag="--model-opt", example="d_model=64"),
        out=args.out or f"bench/{args.study}",
        recalibrate=args.recalibrate,
    )


def cpu_allocator(system: bool) -> str:
    """Keep freed memory for reuse unless asked not to (afmp.measure.timing.keep_freed_memory);
    says which allocator the timings ran under."""
    if system:
        return "system (glibc's defaults)"
    return "freed memory kept (mallopt)" if timing.keep_freed_memory() else "system (not glibc)"


def main(args: argparse.Namespace) -> int:
    if args.study == "runtime":  # the CPU alone, and no roofline: its own options and files
        return runtime.main(args)
    with usage_errors():
        cfg = config_from_args(args)
        if args.study == "sets":
            sets.check_models(cfg.models)
        if args.study == "pareto":  # every run finished and tested, before anything is written
            for run in args.runs:
                pareto.read_accuracy(Path(run))
        use_threads(args.threads)
    device = torch.device(cfg.device)
    out = Path(cfg.out)
    if cfg.recalibrate or roofline.cached(device, scaling.DTYPES[cfg.dtype]) is None:
        print(f"measuring the roofline of {roofline.device_name(device)} (matmul rate, copy bandwidth) ...")
    calib = roofline.load_or_calibrate(device, scaling.DTYPES[cfg.dtype], refresh=cfg.recalibrate)
    print(
        f"roofline ({calib['device']}, {calib['dtype']}): {calib['peak_flops_per_s'] / 1e12:.2f} TFLOP/s matmul, "
        f"{calib['copy_bytes_per_s'] / 1e9:.1f} GB/s copy"
    )
    machine = machine_state()
    print(f"threads: {machine['threads']} of {machine['cpus']} CPUs, load average {machine['load_1min']:.1f}")
    allocator = cpu_allocator(getattr(args, "system_allocator", False)) if device.type == "cpu" else None
    if allocator:
        print(f"allocator: {allocator}")
    warning = busy_warning(machine) if device.type == "cpu" else None
    if warning:
        print(warning)
    meta = {
        "study": args.study,
        "config": dataclasses.asdict(cfg),
        "calibration": calib,
        "machine": machine,
        "cpu_allocator": allocator,
        "torch": torch.__version__,
        "command": sys.argv,
    }
    if args.study == "pareto":
        meta["runs"] = args.runs
        write_json(out / "bench_config.json", meta)
        rows = pareto.run_pareto(args.runs, cfg, calib, device)
        write_table(out, "pareto", rows, pareto.CSV_COLUMNS)
        plots.plot_pareto(
            rows, out / "pareto.png", pareto.panels(rows), f"test accuracy against cost on {calib['device']}"
        )
        print(f"wrote {out}/pareto.csv, pareto.json, pareto.png")
        return 0
    if args.study == "edge":
        from afmp.bench import edge

        return edge.edge_study(cfg, device, out, meta)
    if args.study == "sets":
        return sets.sets_study(cfg, args, calib, out, meta)
    write_json(out / "bench_config.json", meta)
    rows = scaling.run_scaling(cfg, calib)
    write_table(out, "scaling", rows, scaling.COLUMNS)
    what = f"batch {cfg.batch_size}, {cfg.mode}, {cfg.dtype}, {calib['device']}"
    plots.plot_against_tokens(rows, "ms_median", "step time (ms)", out / "time_vs_tokens.png", what)
    plots.plot_against_tokens(rows, "peak_mb", "peak memory (MB)", out / "memory_vs_tokens.png", what)
    plots.plot_latency_vs_flops(rows, out / "latency_vs_flops.png", calib)
    print(f"wrote {out}/scaling.csv, scaling.json, bench_config.json, *_vs_*.png")
    return 0
