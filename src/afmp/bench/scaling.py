"""The scaling study: every model at every size, costs counted, steps timed, interleaved.

For each size, every model is built, its step's costs counted (afmp.measure.counting),
warmed up (and compiled) and its peak memory measured alone; then the models' steps
are timed in turn, ``repeats`` rounds, so that clock or thermal drift hits them all
alike. A model that runs out of memory gives a row with ``oom`` true; one that
cannot run at all (an option its family lacks, a kernel the device lacks) gives a
row whose ``note`` says why. Either way the run goes on.

A model spec is a name with options: ``afmp_small@backend=reference@sparsity=0``,
``deit_tiny_sdpa@compile=true``, ``vit_natten_flex@window=9``. ``compile`` is the
bench's own option; the others are Config fields of a registered model, or a
baseline's options. Registered models are scaled through ``img_size`` (images) or
``max_len`` (sequences): ``tokens`` is (size / patch)^2 for images, the length for
sequences.

A train step is forward, cross-entropy against class 0 (plus the model's
``aux["losses"]``, afmp.training.losses), backward, with the gradients cleared first (no optimizer step);
an infer step is a forward under ``torch.no_grad`` (under inference_mode, ops bypass the
counting dispatch mode).
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from afmp.bench.baselines import BASELINES
from afmp.bench.compiled_bytes import compiled_bytes
from afmp.measure import counting, roofline, timing
from afmp.registry import config_fields, create_model, list_models, model_entry
from afmp.training.losses import auxiliary_loss
from afmp.utils.options import parse_key_values

COLUMNS = [
    "model", "resolution", "tokens", "batch_size", "mode", "dtype", "precision", "device", "compile",
    "params", "ops_per_step", "matmul_gflops", "total_gflops", "gbytes", "compiled_gbytes", "ms_median", "ms_min", "ms_max", "repeats",
    "peak_mb", "peak_source", "roofline_ms", "roofline_frac", "oom", "note",
]  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchConfig:
    models: list[str]
    resolutions: list[int]
    seq_lengths: list[int] | None = None  # sizes of sequence models; default: resolutions
    batch_size: int = 4
    mode: str = "train"
    dtype: str = "float32"
    precision: str = "autocast"  # "autocast" (fp32 weights) or "cast" (model and input in dtype)
    device: str = "cpu"
    compile: bool = False  # compile every model (a spec's @compile= wins)
    warmup: int = 1
    repeats: int = 3
    num_classes: int = 1000
    model_opts: dict = field(default_factory=dict)  # options for every model that has them
    out: str = "bench"
    recalibrate: bool = False

    def __post_init__(self):
        if self.mode not in ("train", "infer"):
            raise ValueError(f"mode must be train or infer, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.precision not in ("autocast", "cast"):
            raise ValueError(f"precision must be autocast or cast, got {self.precision!r}")
        for name in ("batch_size", "repeats", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.models or not self.resolutions:
            raise ValueError("expected at least one model and one resolution")
        for spec in self.models:
            parse_spec(spec)  # fails early on an unknown name


# -- model specs ----------------------------------------------------------------------------
@dataclass
class Spec:
    label: str
    name: str
    options: dict
    compile: bool | None


def parse_spec(text: str) -> Spec:
    """``name@key=value@key=value`` (values read as YAML scalars)."""
    name, *pairs = text.strip().split("@")
    if name not in BASELINES and name not in list_models():
        known = ", ".join([*list_models(), *BASELINES])
        raise ValueError(f"unknown model {name!r}; choose from: {known}")
    options = parse_key_values(pairs, flag=f"model spec {text!r}", example="afmp_small@backend=stencil")
    compile_ = options.pop("compile", None)
    return Spec(text.strip(), name, options, None if compile_ is None else bool(compile_))


@dataclass
class BenchModel:
    module: nn.Module
    make_input: Callable[[int], torch.Tensor]  # batch size -> input batch
    tokens: int
    returns_aux: bool  # forward(x, return_aux=True) -> (logits, aux)


POINTS = "points"  # what a point-set model's size is: its points per set (``--resolutions``)


def size_field(name: str) -> str | None:
    """The Config field a registered model is scaled through (None for baselines)."""
    if name in BASELINES:
        return None
    fields = config_fields(model_entry(name)[0])
    for candidate in ("img_size", "max_len"):
        if candidate in fields:
            return candidate
    if "pos_dim" in fields:  # a point-set model: the size is the points per set, not a Config field
        return POINTS
    raise ValueError(f"model {name!r} has neither img_size nor max_len in its Config; it cannot be scaled")


def build(spec: Spec, size: int, num_classes: int, model_opts: dict, device: torch.device) -> BenchModel:
    if spec.name in BASELINES:
        try:
            module, tokens = BASELINES[spec.name](size, num_classes, device, **spec.options)
        except TypeError as err:
            raise ValueError(f"bad option for baseline {spec.name}: {err}") from None
        return BenchModel(module, lambda b: torch.randn(b, 3, size, size, device=device), tokens, False)
    fields = config_fields(model_entry(spec.name)[0])
    sized = size_field(spec.name)
    opts = {k: v for k, v in model_opts.items() if k in fields}
    if "num_classes" in fields:
        opts["num_classes"] = num_classes
    sized_opt = {} if sized == POINTS else {sized: size}
    module = create_model(spec.name, **{**opts, **spec.options, **sized_opt})
    return registered_bench_model(module.to(device), sized, size)


def registered_bench_model(module: nn.Module, sized: str, size: int) -> BenchModel:
    """A registered model at ``size`` (its ``sized`` Config field): inputs from example_input."""
    tokens = (size // getattr(module.cfg, "patch_size", 1)) ** 2 if sized == "img_size" else size
    return BenchModel(module, lambda b: module.example_input(b, size), tokens, True)


# -- one step -------------------------------------------------------------------------------
def precision_context(cfg: BenchConfig, device: torch.device):
    if cfg.dtype == "float32" or cfg.precision == "cast":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[cfg.dtype])


def make_input(bm: BenchModel, batch: int, cfg: BenchConfig) -> torch.Tensor:
    return cast_input(bm.make_input(batch), cfg)


def cast_input(x, cfg: BenchConfig):
    if isinstance(x, dict):  # a point-set batch
        return {key: cast_input(value, cfg) for key, value in x.items()}
    return x.to(DTYPES[cfg.dtype]) if cfg.precision == "cast" and x.is_floating_point() else x


def make_step(bm: BenchModel, model: nn.Module, cfg: BenchConfig, device: torch.device):
    """``step(x)``: one step of ``model`` (``bm.module`` or its compiled form) on batch ``x``.

    Inputs are made before each timed step and dropped after it, so that the models
    waiting their turn hold only their weights on the device, never a batch.
    """
    if cfg.mode == "infer":

        def step(x):
            with torch.no_grad(), precision_context(cfg, device):
                return model(x)

        return step

    def step(x):
        bm.module.zero_grad(set_to_none=True)
        with precision_context(cfg, device):
            out = model(x, return_aux=True) if bm.returns_aux else model(x)
            logits, aux = out if bm.returns_aux else (out, {})
            flat = logits.flatten(0, -2).float()
            target = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
            loss = F.cross_entropy(flat, target) + auxiliary_loss(aux, flat)
        loss.backward()

    return step


# -- the study ------------------------------------------------------------------------------
def sizes_for(spec: Spec, cfg: BenchConfig) -> list[int]:
    if size_field(spec.name) == "max_len" and cfg.seq_lengths:
        return cfg.seq_lengths
    return cfg.resolutions


def run_scaling(cfg: BenchConfig, calib: dict, log=print) -> list[dict]:
    """Rows of the study (see COLUMNS), sizes in order, models interleaved within a size."""
    device = torch.device(cfg.device)
    specs = [parse_spec(s) for s in cfg.models]
    lists = [sizes_for(spec, cfg) for spec in specs]
    rows = []
    for i in range(max(len(sizes) for sizes in lists)):
        todo = [
            (
                blank_row(spec.label, sizes[i], cfg, spec.compile),
                partial(build, spec, sizes[i], cfg.num_classes, cfg.model_opts, device),
            )
            for spec, sizes in zip(specs, lists)
            if i < len(sizes)
        ]
        rows += bench_one_size(todo, cfg, calib, device, log)
    return rows


def bench_one_size(todo: list[tuple[dict, Callable[[], BenchModel]]], cfg, calib, device, log) -> list[dict]:
    """Fill in each (row, model builder) of one size: prepare each model, then time them in turn."""
    torch._dynamo.reset()  # new modules at a new size: start from a clean compile cache
    # Each size compiles new modules and shapes; never fall back to eager silently.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    rows, live = [], []
    for row, make in todo:
        rows.append(row)
        log(f"{row['model']:32s} {row['resolution']:5d} building, counting costs, warming up ...")
        try:
            live.append((row, *prepare(make, cfg, calib, device, row, log)))
        except Exception as err:  # noqa: BLE001 - any failure is a row, and the run goes on
            record_failure(row, err, log)
        free(device)
    times = {id(row): [] for row, *_ in live}
    for _ in range(cfg.repeats):
        for row, bm, step in list(live):
            failed, x = False, None
            try:
                x = make_input(bm, cfg.batch_size, cfg)
                times[id(row)].append(timing.time_step_ms(partial(step, x), device))
            except Exception as err:  # noqa: BLE001
                record_failure(row, err, log)
                live.remove((row, bm, step))
                failed = True
            x = None  # no batch stays on the device while the other models run
            if failed:
                free(device)  # outside the except block, once the traceback's frames are released
    for row, *_ in live:
        ms = times[id(row)]
        row.update(ms_median=statistics.median(ms), ms_min=min(ms), ms_max=max(ms), repeats=len(ms))
        row["roofline_frac"] = row["roofline_ms"] / row["ms_median"]
        log(
            f"{row['model']:32s} {row['resolution']:5d} tokens {row['tokens']:6d}  "
            f"{row['ms_median']:9.2f} ms  {row['peak_mb']:9.1f} MB  {row['total_gflops']:9.2f} GFLOP  "
            f"{row['gbytes']:8.3f} GB  {row['ops_per_step']:6d} ops  roofline {row['roofline_ms']:8.2f} ms"
            + (f"  compiled {row['compiled_gbytes']:.3f} GB" if row["compile"] else "")
        )
    del live
    free(device)
    return rows


def prepare(make: Callable[[], BenchModel], cfg: BenchConfig, calib: dict, device, row: dict, log=print):
    """Build, count, warm up and measure the memory of one model: (model, its step)."""
    started = time.perf_counter()
    torch.manual_seed(0)
    baseline = timing.memory_in_use(device)
    bm = make()
    if cfg.precision == "cast":
        bm.module.to(DTYPES[cfg.dtype])
    bm.module.train(cfg.mode == "train")
    row.update(tokens=bm.tokens, params=sum(p.numel() for p in bm.module.parameters()))
    eager = make_step(bm, bm.module, cfg, device)
    costs = counting.count_step(lambda b: partial(eager, make_input(bm, b, cfg)), cfg.batch_size)
    row.update(
        ops_per_step=round(costs.ops),  # the same at every batch size: the extrapolation keeps it
        matmul_gflops=costs.matmul_flops / 1e9,
        total_gflops=costs.total_flops / 1e9,
        gbytes=costs.bytes / 1e9,
        roofline_ms=roofline.roofline_ms(costs.total_flops, costs.bytes, calib),
    )
    counted_at = time.perf_counter()
    model = torch.compile(bm.module, dynamic=False) if row["compile"] else bm.module
    step = make_step(bm, model, cfg, device)
    x = make_input(bm, cfg.batch_size, cfg)
    warmup = cfg.warmup
    if row["compile"]:  # the first step compiles forward and backward: count their kernels' bytes
        with compiled_bytes() as counted:
            step(x)
        row["compiled_gbytes"] = counted.bytes / 1e9
        warmup -= 1
    for _ in range(warmup):
        step(x)
    row["peak_mb"], row["peak_source"] = timing.peak_step_mb(partial(step, x), device, baseline)
    # What preparing costs, so that a GPU lease's time limits can be set from it.
    log(
        f"{row['model']:32s} {row['resolution']:5d} ready: {counted_at - started:.1f} s building and counting, "
        f"{time.perf_counter() - counted_at:.1f} s {'compiling and ' if row['compile'] else ''}warming up"
    )
    return bm, step


def blank_row(label: str, size: int, cfg: BenchConfig, compile_: bool | None = None) -> dict:
    row = dict.fromkeys(COLUMNS, math.nan)
    row.update(
        model=label,
        resolution=size,
        batch_size=cfg.batch_size,
        mode=cfg.mode,
        dtype=cfg.dtype,
        precision=cfg.precision if cfg.dtype != "float32" else "",
        device=cfg.device,
        compile=bool(cfg.compile if compile_ is None else compile_),
        repeats=0,
        peak_source="",
        oom=False,
        note="",
    )
    return row


def record_failure(row: dict, err: BaseException, log) -> None:
    if timing.is_oom(err):
        row.update(oom=True, note="out of memory")
    else:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        row["note"] = f"skipped: {type(err).__name__}: {first}"
    row.update(ms_median=math.nan, ms_min=math.nan, ms_max=math.nan, roofline_frac=math.nan)
    log(f"{row['model']:32s} {row['resolution']:5d} {row['note']}", file=sys.stderr)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
