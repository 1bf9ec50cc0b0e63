"""Every edge backend against the reference on one device: the check a GPU run makes first.

``crosscheck(device, dtypes, grids)`` runs each backend that can run on ``device`` on the
same inputs as the reference, in each dtype, on grids of odd shapes, and compares the
scores, the aggregate, the gate means and every gradient (forward and backward of both
halves of the stage), then the same for the backend's whole layer (``layer``, which for
``gather`` is one op of its own, afmp.ops.fused_layer): new states, gate means and the
gradients of the states, the predictive signal and every weight. The layer is checked
dense, because a score rounded differently may swap which edges top-k keeps. The reference runs in float64 on the same (rounded) inputs, so what
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
from afmp.ops.edge import LayerWeights, topk_keep

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


def _layer(backend, inputs: dict, sc) -> dict:
    """Forward and backward of the backend's whole layer, dense: {name: tensor}."""
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in ("h", "t", *LayerWeights._fields)}
    weights = LayerWeights(*(leaves[k] for k in LayerWeights._fields))
    out, gate_mean = backend.layer(leaves["h"], leaves["t"], weights, backend.prepare(sc, leaves["h"]), 0.0)
    loss = (out.double() * inputs["dout"]).sum() + (gate_mean.double() * inputs["dgm"]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"layer states": out, "layer gate means": gate_mean} | {
        f"layer d{name}": g for name, g in zip(leaves, grads)
    }


def _layer_inputs(x: dict, gen) -> dict:
    """The layer's inputs, from the stage's: its states and weights in the stage's dtype."""
    ref = x["h"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(device=ref.device, dtype=ref.dtype)

    width = 2 * D + 2 * R + 2 * F
    return x | dict(
        t=rnd(*ref.shape),
        proj_w=rnd(width, D, scale=D**-0.5),
        proj_b=rnd(width),
        U=rnd(R, R, scale=R**-0.5),
        pred_w=rnd(D, D, scale=D**-0.5),
        pred_b=rnd(D),
    )


def _compare(name, got, want, allowed, log, where) -> tuple | None:
    """(what differs most, its error, what is allowed) if a backend is off the reference, else None."""
    errors = {k: _error(got[k], want[k]) for k in want}
    worst = max(errors, key=lambda k: errors[k] / allowed[k])
    ok = errors[worst] <= allowed[worst]
    log(
        f"  {name:10s} {where} worst: {worst} {errors[worst]:.2e} (allowed {allowed[worst]:.1e})"
        f"  {'ok' if ok else 'DIFFERS'}"
    )
    return None if ok else (worst, errors[worst], allowed[worst])


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
            inputs = _layer_inputs(_inputs(sc, dtype, device, gen, sparsity), gen)
            as64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
            reference = EDGE_BACKENDS["reference"]
            for check in (_stage, _layer):  # the stage's two halves, then the whole layer
                want = check(reference, as64, sc)
                # What the reference itself loses in this dtype: a backend may lose up to SLACK times as much.
                own = check(reference, inputs, sc)
                allowed = {k: max(TOLERANCE[dtype], SLACK * _error(own[k], want[k])) for k in want}
                for name in names:
                    backend = EDGE_BACKENDS[name]
                    why = backend.why_not(device) or backend.input_why_not(sc)
                    where = f"{grid[0]}x{grid[1]} {str(dtype).removeprefix('torch.'):9s}"
                    if why:
                        if check is _stage:
                            log(f"  {name:10s} {where} skipped: {why}")
                        continue
                    bad = _compare(name, check(backend, inputs, sc), want, allowed, log, where)
                    if bad:
                        found.append(Mismatch(name, dtype, grid, *bad))
    return found
