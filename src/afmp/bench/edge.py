"""AFMP's per-edge stage alone, per backend: time, and bandwidth against the copy bandwidth.

One layer's stage, forward and backward: edge scores, gated aggregation (and, timed
apart, the per-image top-k between them), on random per-token tensors of the model's
shapes. Its bandwidth is the bytes the stage *must* move divided by its time; the
device's measured device-to-device copy bandwidth is the ceiling (``afmp.measure.roofline``).

Bytes it must move, per token, in ``dtype`` (P = 2R + 2F + 3D: q, k, a, b, h, p, m):
    forward   reads P, writes out (D) + s and gate_mean (2K)
    backward  reads P + dout (D) + d gate_mean (K) + s (K), writes the P gradients
so 3P + 2D + 4K elements per token. Gathering neighbours' rows again costs nothing
here: a kernel that reads them from L2 moves no more from memory.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from afmp import scaffold
from afmp.bench import scaling
from afmp.ops import EDGE_BACKENDS, select_edge_backend
from afmp.ops.edge import topk_keep
from afmp.registry import resolve_config
from afmp.utils.errors import usage_errors
from afmp.utils.files import write_json, write_table


def edge_stage_bytes(
    batch: int, tokens: int, max_degree: int, d_model: int, k_dim: int, score_hidden: int, itemsize: int
) -> int:
    """The least the stage moves from and to memory, forward and backward (module docstring)."""
    per_token = 2 * k_dim + 2 * score_hidden + 3 * d_model
    return batch * tokens * (3 * per_token + 2 * d_model + 4 * max_degree) * itemsize


def _inputs(batch, sc, d_model, k_dim, score_hidden, dtype, device, gen):
    n = sc.num_tokens

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype).requires_grad_()

    return dict(
        q=rand(batch, n, k_dim, scale=k_dim**-0.5),
        k=rand(batch, n, k_dim),
        a=rand(batch, n, score_hidden),
        b=rand(batch, n, score_hidden),
        h=rand(batch, n, d_model),
        p=rand(batch, n, d_model),
        w_err=rand(score_hidden, scale=0.1),
        w_len=rand(score_hidden, scale=0.1),
        w_out=rand(score_hidden, scale=0.1),
        b_out=rand(),
        m=rand(batch, n, d_model),
        w_g=rand(d_model),
        b_g=rand(d_model),
    )


def edge_stage_bandwidth(
    batch: int,
    grid: int | tuple[int, int],
    d_model: int,
    dtype: torch.dtype,
    device: torch.device | str,
    backends: list[str],
    *,
    k_dim: int = 64,
    score_hidden: int = 64,
    sparsity: float = 0.3,
    repeats: int = 10,
    layout: str = "delaunay",
    radius: int = 1,
) -> list[dict]:
    """One dict per backend: times (median ms), bytes it must move, GB/s, fraction of copy GB/s.

    ``grid``: the token grid (side, or (height, width)) of a ``layout`` scaffold
    (afmp.scaffold.LAYOUTS; ``radius`` for ``window``). A backend that runs out of memory gets ``"error": "out of
    memory"`` instead of figures.
    """
    from afmp.measure.roofline import load_or_calibrate
    from afmp.measure.timing import is_oom, time_step_ms

    device = torch.device(device)
    height, width = (grid, grid) if isinstance(grid, int) else grid
    sc = scaffold.build(layout, height, width, radius).to(device)
    copy_bytes_per_s = load_or_calibrate(device, dtype)["copy_bytes_per_s"]
    moved = edge_stage_bytes(
        batch,
        sc.num_tokens,
        sc.max_degree,
        d_model,
        k_dim,
        score_hidden,
        torch.empty((), dtype=dtype).itemsize,
    )
    base = dict(
        batch=batch,
        grid=f"{height}x{width}",
        layout=layout,
        tokens=sc.num_tokens,
        max_degree=sc.max_degree,
        d_model=d_model,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        bytes=moved,
        copy_gb_per_s=copy_bytes_per_s / 1e9,
    )
    results = []
    for name in backends:
        row = dict(base, backend=name)
        try:
            row.update(
                _measure(
                    select_edge_backend(name, device, sc),
                    sc,
                    batch,
                    d_model,
                    k_dim,
                    score_hidden,
                    dtype,
                    device,
                    sparsity,
                    repeats,
                    time_step_ms,
                )
            )
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            row["error"] = "out of memory"
        else:
            row["gb_per_s"] = moved / (row["fwd_bwd_ms"] / 1e3) / 1e9
            row["fraction_of_copy"] = row["gb_per_s"] / base["copy_gb_per_s"]
        results.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _measure(
    be, sc, batch, d_model, k_dim, score_hidden, dtype, device, sparsity, repeats, time_step_ms
) -> dict:
    gen = torch.Generator(device).manual_seed(0)
    x = _inputs(batch, sc, d_model, k_dim, score_hidden, dtype, device, gen)
    score_args = [x[n] for n in ("q", "k", "a", "b", "h", "p", "w_err", "w_len", "w_out", "b_out")]
    leaves = [*score_args, x["m"], x["w_g"], x["b_g"]]
    dout = torch.randn(batch, sc.num_tokens, d_model, generator=gen, device=device).to(dtype)
    dgm = torch.randn(batch, sc.num_tokens, sc.max_degree, generator=gen, device=device).to(dtype)
    with torch.no_grad():
        s0 = be.edge_scores(*score_args, sc)
    keep = topk_keep(s0, sc.mask, sc.num_edges, sparsity)  # fixed, so the timed stage is the kernels'

    def forward():
        s = be.edge_scores(*score_args, sc)
        return be.gated_aggregate(s, keep, x["m"], x["w_g"], x["b_g"], sc)

    def forward_backward():
        out, gate_mean = forward()
        torch.autograd.grad([out, gate_mean], leaves, [dout, dgm])

    def median_ms(fn):
        for _ in range(3):  # warm-up: compilation, allocator
            fn()
        return statistics.median(time_step_ms(fn, device) for _ in range(repeats))

    row = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    row["fwd_bwd_ms"] = median_ms(forward_backward)
    if device.type == "cuda":
        row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with torch.no_grad():
        row["fwd_ms"] = median_ms(forward)
    row["topk_ms"] = median_ms(lambda: topk_keep(s0, sc.mask, sc.num_edges, sparsity))
    return row


# -- the study: afmp bench edge ------------------------------------------------------------
EDGE_COLUMNS = [
    "resolution",
    "grid",
    "layout",
    "tokens",
    "max_degree",
    "batch",
    "d_model",
    "dtype",
    "device",
    "backend",
    "fwd_ms",
    "fwd_bwd_ms",
    "bytes",
    "gb_per_s",
    "copy_gb_per_s",
    "fraction_of_copy",
    "error",
]


def edge_study(cfg: scaling.BenchConfig, device: torch.device, out: Path, meta: dict) -> int:
    """AFMP-Small's per-edge stage alone (its preset's patch and width, or --model-opt
    patch_size=/d_model=), each backend that can run here: the bytes it must move over its
    forward+backward time, against the measured copy bandwidth. ``--model-opt
    scaffold=LAYOUT`` (and ``window_radius=R``) picks the scaffold."""

    backends = [name for name, be in EDGE_BACKENDS.items() if be.why_not(device) is None]
    with usage_errors():
        preset = resolve_config("afmp_small", **cfg.model_opts)
    layout, radius = preset.scaffold, preset.window_radius
    write_json(out / "edge_config.json", {**meta, "backends": backends, "scaffold": layout})
    rows = []
    for resolution in cfg.resolutions:
        for row in edge_stage_bandwidth(
            cfg.batch_size,
            resolution // preset.patch_size,
            preset.d_model,
            scaling.DTYPES[cfg.dtype],
            device,
            backends,
            repeats=cfg.repeats,
            layout=layout,
            radius=radius,
        ):
            rows.append({"resolution": resolution, **row})
            print(
                " ".join(
                    f"{k}={row.get(k)}"
                    for k in ("grid", "backend", "fwd_bwd_ms", "gb_per_s", "fraction_of_copy", "error")
                    if k in row
                )
            )
    write_table(out, "edge", rows, EDGE_COLUMNS)
    print(f"wrote {out}/edge.csv, edge.json, edge_config.json")
    return 0
