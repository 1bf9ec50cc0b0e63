"""Every edge backend against the reference on one device: the check a GPU run makes first.

``crosscheck(device, dtypes, grids)`` runs each backend that can run on ``device`` on the
same inputs as the reference, in each dtype, on grids of odd shapes, and compares the
scores, the aggregate, the gate means and every gradient (forward and backward of both
halves of the stage). The reference runs in float64 on the same (rounded) inputs, so what
is measured is the backend's own error. ``scripts/gpu_backend_check.py`` is its command
line; the CPU test suite runs it too, with the backends the CPU has.

A difference is measured normwise, max |got - want| / max |want|, and a backend passes where
it is within ``TOLERANCE`` of its dtype (float32 keeps about 7 digits: 1e-4 leaves room for
sums in another order) or within ``SLACK`` times what the reference itself loses when it
runs in that dtype (bfloat16's 8-bit mantissa costs every backend several percent on the
gradients that sum over many slots).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afmp import scaffold as scaffolds
from afmp.ops import EDGE_BACKENDS, edge
from afmp.ops.edge import topk_keep

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float64: 1e-10}
SLACK = 4
# Odd shapes on purpose: a chain (1 x N), a grid that is not square nor a power of two,
# and a large one (a tile of the kernels that is not the whole grid).
GRIDS = ((1, 13), (7, 9), (64, 64))
B, R, F, D = 2, 8, 8, 16


@dataclass
class Mismatch:
    backend: str
    dtype: torch.dtype
    grid: tuple[int, int]
    what: str  # the output or gradient
    error: float  # normwise relative
    allowed: float

    def __str__(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        return (
            f"backend {self.backend!r} differs from the reference on a {self.grid[0]}x{self.grid[1]} grid in "
            f"{name}: {self.what}, relative error {self.error:.2e} > {self.allowed:.1e}"
        )


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    if not bool(got.isfinite().all()):
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


# The stage's differentiable inputs, in the order edge_scores and gated_aggregate take them.
SCORE_INPUTS = ("q", "k", "a", "b", "h", "p", "w_err", "w_len", "w_out", "b_out")
AGGREGATE_INPUTS = ("m", "w_g", "b_g")


def _stage(fns, inputs: dict, sc) -> dict:
    """Forward and backward of both halves: {name: tensor} of outputs and gradients."""
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in SCORE_INPUTS + AGGREGATE_INPUTS}
    scores = fns.edge_scores(*(leaves[k] for k in SCORE_INPUTS), sc)
    out, gate_mean = fns.gated_aggregate(scores, inputs["keep"], *(leaves[k] for k in AGGREGATE_INPUTS), sc)
    # Cotangents fixed by the inputs: every gradient is compared for the same upstream values.
    # Padding slots' scores mean nothing in the reference: they get no cotangent, as in the model.
    loss = (out.double() * inputs["dout"]).sum() + (gate_mean.double() * inputs["dgm"]).sum()
    loss = loss + (scores.double() * inputs["ds"] * sc.mask).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    results = {"scores": scores * sc.mask, "aggregate": out, "gate means": gate_mean}
    results.update({f"d{name}": g for name, g in zip(leaves, grads)})
    return results


def _inputs(sc, dtype: torch.dtype, device, gen, sparsity: float) -> dict:
    n, kk = sc.num_tokens, sc.max_degree

    def rnd(*shape, dtype=dtype):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    x = dict(q=rnd(B, n, R), k=rnd(B, n, R), a=rnd(B, n, F), b=rnd(B, n, F), h=rnd(B, n, D), p=rnd(B, n, D))
    x.update(w_err=rnd(F), w_len=rnd(F), w_out=rnd(F), b_out=rnd(), m=rnd(B, n, D), w_g=rnd(D), b_g=rnd(D))
    f64 = torch.float64
    x.update(dout=rnd(B, n, D, dtype=f64), dgm=rnd(B, n, kk, dtype=f64), ds=rnd(B, n, kk, dtype=f64))
    with torch.no_grad():  # which edges are pruned: from the reference's scores, for every backend
        s = edge.edge_scores(*(x[k] for k in SCORE_INPUTS), sc)
    x["keep"] = topk_keep(s, sc.mask, sc.num_edges, sparsity)
    return x


def crosscheck(
    device: torch.device | str,
    dtypes=(torch.float32, torch.bfloat16),
    grids=GRIDS,
    backends: list[str] | None = None,
    sparsity: float = 0.3,
    log=print,
) -> list[Mismatch]:
    """The mismatches of every backend that runs on ``device`` (or of ``backends``); [] when all agree."""
    device = torch.device(device)
    names = backends or [n for n in EDGE_BACKENDS.names() if n not in ("auto", "reference")]
    found = []
    for grid in grids:
        sc = scaffolds.delaunay_grid(*grid).to(device)
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(grid[0] * 1000 + grid[1])
            inputs = _inputs(sc, dtype, device, gen, sparsity)
            want = _stage(
                edge, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}, sc
            )
            # What the plain reference itself loses in this dtype: a backend may lose up to SLACK times as much.
            own = _stage(edge, inputs, sc)
            allowed = {k: max(TOLERANCE[dtype], SLACK * _error(own[k], want[k])) for k in want}
            for name in names:
                backend = EDGE_BACKENDS[name]
                why = backend.why_not(device) or backend.input_why_not(sc)
                shape = f"{grid[0]}x{grid[1]} {str(dtype).removeprefix('torch.'):9s}"
                if why:
                    log(f"  {name:10s} {shape} skipped: {why}")
                    continue
                got = _stage(backend, inputs, sc)
                errors = {k: _error(got[k], want[k]) for k in want}
                worst = max(errors, key=lambda k: errors[k] / allowed[k])
                ok = errors[worst] <= allowed[worst]
                log(
                    f"  {name:10s} {shape} worst: {worst} {errors[worst]:.2e} (allowed {allowed[worst]:.1e})"
                    f"  {'ok' if ok else 'DIFFERS'}"
                )
                if not ok:
                    found.append(Mismatch(name, dtype, grid, worst, errors[worst], allowed[worst]))
    return found
