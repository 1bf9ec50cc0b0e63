"""`afmp bench sets`: point-set models on synthetic sets as the points per set grow, with the
scaffold's construction timed apart.

    afmp bench sets                                  # afmp_points, graph_gat, graph_gatedgcn; 2-D uniform
    afmp bench sets --points 1000,4000,16000,64000 --layouts uniform,clustered --dims 2,3 --threads 1

For each layout, dimension and size N one set of N points is drawn (seeded by the three):
``uniform`` in the unit square or cube, or ``clustered``, Gaussian blobs (std ``SPREAD``)
around ``CLUSTERS`` centres drawn in it. Its scaffold is built as the data pipeline builds
it (afmp.data.points.point_graph: the checks, Delaunay or kNN, the padded lists, the
lengths), ``repeats`` times; the median is ``scaffold_ms``. Then every model is measured
on a batch of ``--batch-size`` copies of that set by the scaling study's machinery
(afmp.bench.scaling.bench_one_size: FLOPs and bytes counted, peak memory, steps timed in
turn). The scaffold is built in the data pipeline, not in ``forward``, so a step's time
leaves it out: ``scaffold_ms`` is its own column.

Each series (a model, or the scaffold, at one layout and dimension) gets fitted exponents,
time ∝ N^a, memory ∝ N^b, FLOPs ∝ N^c, over its ``FIT_POINTS`` largest sizes that ran, as
``afmp bench scaling``'s plots fit them (afmp.bench.plots). Writes sets.csv and sets.json (a
row per model and set), fits.csv and fits.json, bench_config.json, time_vs_points.png and
memory_vs_points.png under --out.
"""

from __future__ import annotations

import argparse
import math
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch

from afmp.bench import plots, scaling
from afmp.data.points.sets import GRAPHS, collate_point_sets, point_graph
from afmp.measure import timing
from afmp.registry import config_fields, create_model, model_entry
from afmp.utils.files import write_json, write_table
from afmp.utils.runtime import to_device

LAYOUTS = ("uniform", "clustered")
CLUSTERS, SPREAD = 16, 0.03
DEFAULTS = dict(
    models=["afmp_points", "graph_gat", "graph_gatedgcn"],
    resolutions=[1_000, 4_000, 16_000],  # points per set
    batch_size=1,
    dtype="float32",
    warmup=1,
    repeats=3,
    num_classes=10,  # the presets' (mnist5k-superpixels'), so the parameters are theirs
)
COLUMNS = ["model", "layout", "dim", "graph", "edges", "max_degree", "scaffold_ms"] + [
    c for c in scaling.COLUMNS if c != "model"
]
FIT_COLUMNS = [
    "series",
    "layout",
    "dim",
    "sizes",
    "from_points",
    "to_points",
    "time_exp",
    "memory_exp",
    "flops_exp",
]
CPU = torch.device("cpu")
ALLOCATOR_ENV = (
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
)


# -- command line (afmp.bench.cli adds the options every study shares) -----------------------
def names(choices):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values or set(values) - set(choices):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated names from {', '.join(map(str, choices))}, got {text!r}"
            )
        return values

    return parse


def point_counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 3:
        raise argparse.ArgumentTypeError(f"expected comma-separated point counts of at least 3, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models", help=f"comma-separated point-set models (default {','.join(DEFAULTS['models'])})"
    )
    p.add_argument(
        "--points", dest="resolutions", type=point_counts, help="points per set, e.g. 1000,4000,16000"
    )
    p.add_argument("--batch-size", type=int, help="sets per step, copies of one set (default 1)")
    p.add_argument("--mode", choices=["train", "infer"], help="a training step (default) or a forward")
    p.add_argument("--layouts", type=names(LAYOUTS), help="uniform, clustered or both (default uniform)")
    p.add_argument("--dims", type=names(("2", "3")), help="2, 3 or both (default 2)")
    p.add_argument("--graph", choices=GRAPHS, help="the scaffold: delaunay (default) or knn")


# -- the sets --------------------------------------------------------------------------------
def synthetic_positions(layout: str, dim: int, n: int) -> np.ndarray:
    """(n, dim) float32 positions of a ``layout`` set (see the module's docstring), seeded by all three."""
    rng = np.random.default_rng([LAYOUTS.index(layout), dim, n])
    if layout == "uniform":
        positions = rng.random((n, dim))
    else:
        centres = rng.random((CLUSTERS, dim))
        positions = centres[rng.integers(CLUSTERS, size=n)] + rng.normal(0.0, SPREAD, (n, dim))
    return positions.astype(np.float32)  # as the data sets store them


def build_into(built: dict, positions: np.ndarray, graph: str) -> None:
    """The scaffold of ``positions`` into ``built`` (a timed call's result is dropped)."""
    built.update(point_graph(positions, graph))


def built_scaffold(positions: np.ndarray, graph: str, repeats: int) -> tuple[dict, float]:
    """(the set's scaffold arrays, median ms of building them ``repeats`` times)."""
    built: dict = {}
    build = partial(build_into, built, positions.astype(np.float64), graph)
    ms = [timing.time_step_ms(build, CPU) for _ in range(repeats)]
    return built, float(np.median(ms))


def set_model(spec: scaling.Spec, dim: int, example: dict, cfg, device) -> scaling.BenchModel:
    """``spec``'s model for ``dim``-D positions, its inputs ``b`` copies of ``example`` with features."""
    fields = config_fields(model_entry(spec.name)[0])
    opts = {k: v for k, v in cfg.model_opts.items() if k in fields}
    module = create_model(
        spec.name, **{**opts, "pos_dim": dim, "num_classes": cfg.num_classes, **spec.options}
    )
    n = example["positions"].shape[0]
    features = np.random.default_rng(0).standard_normal((n, module.cfg.in_features)).astype(np.float32)
    one = {**example, "features": features}

    def make_input(b: int) -> dict:
        return to_device(collate_point_sets([(one, 0)] * b)[0], device)

    return scaling.BenchModel(module.to(device), make_input, n, True)


def check_models(models: list[str]) -> None:
    for spec in map(scaling.parse_spec, models):
        if scaling.size_field(spec.name) != scaling.POINTS:
            raise ValueError(
                f"afmp bench sets measures point-set models (afmp_points, graph_*), not {spec.name!r}"
            )


def run_sets(cfg, layouts, dims, graph: str, calib: dict, log=print) -> list[dict]:
    """Rows of the study (COLUMNS): layout by layout, dimension by dimension, size by size."""
    import scipy.spatial  # noqa: F401  (imported here, not inside the first timed scaffold)

    device = torch.device(cfg.device)
    check_models(cfg.models)
    specs = [scaling.parse_spec(s) for s in cfg.models]
    rows = []
    for layout in layouts:
        for dim in dims:
            for n in cfg.resolutions:
                positions = synthetic_positions(layout, dim, n)
                graph_arrays, scaffold_ms = built_scaffold(positions, graph, cfg.repeats)
                example = {"positions": positions, **graph_arrays}
                example["length"] = example["length"].astype(np.float32)
                edges, degree = int(example["mask"].sum()), int(example["mask"].shape[1])
                log(
                    f"{layout} {dim}-D, {n} points: scaffold ({graph}) {scaffold_ms:.1f} ms, {edges} edges, K = {degree}"
                )
                extra = dict(
                    layout=layout,
                    dim=dim,
                    graph=graph,
                    edges=edges,
                    max_degree=degree,
                    scaffold_ms=scaffold_ms,
                )
                todo = [
                    (
                        {**scaling.blank_row(spec.label, n, cfg, spec.compile), **extra},
                        partial(set_model, spec, dim, example, cfg, device),
                    )
                    for spec in specs
                ]
                rows += scaling.bench_one_size(todo, cfg, calib, device, log)
    return rows


# -- fitted exponents ----------------------------------------------------------------------------
def exponent(rows: list[dict], key: str) -> float:
    """Slope of log ``key`` against log N over ``rows`` where it is a positive number."""
    pts = [
        (r["tokens"], r[key])
        for r in rows
        if isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0
    ]
    return plots.scaling_exponent(*zip(*pts)) if len(pts) > 1 else math.nan


def fits(rows: list[dict]) -> list[dict]:
    """One row per series (FIT_COLUMNS): each model's, and the scaffold's, per layout and dimension."""
    out = []
    keys = dict.fromkeys((r["layout"], r["dim"]) for r in rows)
    for layout, dim in keys:
        mine = [r for r in rows if (r["layout"], r["dim"]) == (layout, dim)]
        scaffold = {r["tokens"]: {"tokens": r["tokens"], "scaffold_ms": r["scaffold_ms"]} for r in mine}
        series = [(f"scaffold ({mine[0]['graph']})", list(scaffold.values()), {"time_exp": "scaffold_ms"})]
        for model, group in plots.by_model(mine).items():
            ran = [r for r in group if not r["oom"] and math.isfinite(r["ms_median"])]
            series.append(
                (model, ran, {"time_exp": "ms_median", "memory_exp": "peak_mb", "flops_exp": "total_gflops"})
            )
        for name, points, measures in series:
            top = sorted(points, key=lambda r: r["tokens"])[-plots.FIT_POINTS :]
            row = dict.fromkeys(FIT_COLUMNS, math.nan)
            row.update(series=name, layout=layout, dim=dim, sizes=len(top))
            if top:
                row.update(from_points=top[0]["tokens"], to_points=top[-1]["tokens"])
            row.update({column: exponent(top, key) for column, key in measures.items()})
            out.append(row)
    return out


# -- the tables ------------------------------------------------------------------------------------
def table_lines(rows: list[dict], fitted: list[dict]) -> list[str]:
    """Both tables in Markdown, as docs/results.md quotes them."""
    lines = [
        "| model | layout | d | points | edges | K | scaffold ms | step ms | peak MB | GFLOP |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['dim']} | {r['tokens']} | {r['edges']} | {r['max_degree']} "
            f"| {r['scaffold_ms']:.1f} | {r['ms_median']:.1f} | {r['peak_mb']:.0f} | {r['total_gflops']:.2f} |"
            + (f" {r['note']}" if r["note"] else "")
        )
    lines += [
        "",
        f"Fitted over each series' {plots.FIT_POINTS} largest sizes that ran: time ∝ N^a, memory ∝ N^b, FLOPs ∝ N^c.",
        "",
        "| series | layout | d | points | a (time) | b (memory) | c (FLOPs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in fitted:
        span = f"{f['from_points']}–{f['to_points']}" if f["sizes"] else "—"
        lines.append(
            f"| {f['series']} | {f['layout']} | {f['dim']} | {span} | {f['time_exp']:.2f} "
            f"| {f['memory_exp']:.2f} | {f['flops_exp']:.2f} |"
        )
    return lines


def sets_study(cfg, args, calib: dict, out: Path, meta: dict) -> int:
    """`afmp bench sets`: measure, write the files, print the tables."""
    layouts, dims, graph = (
        args.layouts or ["uniform"],
        [int(d) for d in args.dims or ["2"]],
        args.graph or "delaunay",
    )
    # How the C allocator was set: on the CPU it decides how much of a large set's step is
    # page faults (docs/results.md, "Scaling on sets").
    allocator = {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}
    meta.update(layouts=layouts, dims=dims, graph=graph, allocator_env=allocator)
    write_json(out / "bench_config.json", meta)
    rows = run_sets(cfg, layouts, dims, graph, calib)
    fitted = fits(rows)
    write_table(out, "sets", rows, COLUMNS)
    write_table(out, "fits", fitted, FIT_COLUMNS)
    what = f"batch {cfg.batch_size}, {cfg.mode}, {cfg.dtype}, {calib['device']}"
    labelled = [{**r, "model": f"{r['model']} {r['layout']} {r['dim']}-D"} for r in rows]
    scaffolds = {
        (r["layout"], r["dim"], r["tokens"]): {
            "model": f"scaffold {r['layout']} {r['dim']}-D",
            "tokens": r["tokens"],
            "ms_median": r["scaffold_ms"],
            "oom": False,
        }
        for r in rows
    }
    plots.plot_against_tokens(
        [*labelled, *scaffolds.values()], "ms_median", "time (ms)", out / "time_vs_points.png", what
    )
    plots.plot_against_tokens(labelled, "peak_mb", "peak memory (MB)", out / "memory_vs_points.png", what)
    print("\n".join(table_lines(rows, fitted)))
    print(f"wrote {out}/sets.csv, sets.json, fits.csv, fits.json, bench_config.json, *_vs_points.png")
    return 0
