"""AFMP's per-edge stage in few, large ops: every slot at once, backward by hand (backend ``gather``).

Same function as the reference (``afmp.ops.edge``), on the same padded (N, K) neighbour
lists: each operand a neighbour contributes is gathered once for all K slots, as
(B, N, K, C), and every step then works on all slots together. What differs is how it is
dispatched. Autograd through the reference replays every small forward op in the
backward (about three ops for each); here each half of the stage is one
``autograd.Function`` whose backward is written out: a handful of batched ops, and the
adjoint of each gather a single ``index_add``.

That is what small grids need. At 4x4 to 16x16 tokens a step is bound by the number
of ops dispatched, not by FLOPs or bytes (docs/results.md, "AFMP at the sizes people
train"). The price is memory: the forward keeps the gathered rows and the gates for the
backward, (B, N, K, R + F + D) and (B, N, K, 2D), as the reference's autograd does, which
is why ``auto`` takes the stencil (no (B, N, K, D) tensor) on large grids.

Padding slots (a token's own index in the lists) score exactly 0 and pass no gradient,
as in the packed and stencil backends; their gates are 0 through ``keep``.
"""

from __future__ import annotations

import functools

import torch

from afmp.scaffold import Scaffold


def _rows(nbr: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """Row indices of every (image, token, slot)'s neighbour in a (B*N, C) view: (B*N*K,).

    One index_select over rows is several times faster on the CPU than one along the
    token dimension of (B, N, C) (measured: 0.13 against 0.55 ms at B=64, N=49, K=6, C=64).
    Lists of one scaffold per example, (B, N, K), already hold rows of that view.
    """
    if nbr.dim() == 3:
        return nbr.reshape(-1)
    offsets = torch.arange(0, batch * n, n, device=nbr.device)
    return torch.add(nbr.reshape(1, -1), offsets.unsqueeze(1)).reshape(-1)


def _gather(x: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N, C) -> (B, N, K, C): every token's K neighbour rows (one index_select)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, rows).view(x.shape[0], x.shape[1], k, x.shape[-1])


def _scatter_rows(rows_grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``_gather`` on the (B*N, C) view: (B, N, K, C) rows summed back into their tokens."""
    batch, n, _, c = rows_grad.shape
    return rows_grad.new_zeros(batch * n, c).index_add_(0, rows, rows_grad.reshape(-1, c))


def _scatter(rows_grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``_gather``: (B, N, K, C) rows summed back into their tokens, (B, N, C)."""
    return _scatter_rows(rows_grad, rows).view(*rows_grad.shape[:2], rows_grad.shape[-1])


def _weight_grad(rows: torch.Tensor, per_slot: torch.Tensor) -> torch.Tensor:
    """sum over every (b, i, s) of per_slot * rows: a (C,) weight gradient as one matrix-vector
    product, summed in at least float32 (a sum over every slot of the batch)."""
    if rows.dtype in (torch.float32, torch.float64) and per_slot.dtype == rows.dtype:
        return per_slot.reshape(1, -1).mm(rows.reshape(-1, rows.shape[-1])).view(-1)  # fewest ops
    acc = torch.promote_types(rows.dtype, torch.float32)
    return (per_slot.reshape(-1).to(acc) @ rows.reshape(-1, rows.shape[-1]).to(acc)).to(rows.dtype)


class _EdgeScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, a, b, h, p, w_err, w_len, w_out, b_out, nbr, length, mask):
        kk = nbr.shape[-1]
        rows = _rows(nbr, *k.shape[:2])
        k_j = _gather(k, rows, kk)
        # z = a_i + b_j + len w_len (+ e w_err): the score MLP's hidden layer, every slot at once.
        z = _gather(b, rows, kk).add_(a.unsqueeze(2)).addcmul_(length.unsqueeze(-1), w_len)
        err = diff = None
        if p is not None:
            diff = _gather(h, rows, kk).sub_(p.unsqueeze(2))  # h_j - p_i
            err = torch.linalg.vector_norm(diff, dim=-1)
            z.addcmul_(err.unsqueeze(-1), w_err)
        hidden = z.relu_()
        bilinear = (k_j @ q.unsqueeze(-1)).squeeze(-1)  # q_i . k_j, one batched matmul
        scores = torch.addmv(bilinear.add_(b_out).flatten(), hidden.flatten(0, 2), w_out, beta=1)
        scores = scores.view_as(bilinear).mul_(mask)
        ctx.save_for_backward(q, k_j, hidden, diff, err, w_err, w_out, rows, length, mask)
        return scores

    @staticmethod
    def backward(ctx, ds):
        q, k_j, hidden, diff, err, w_err, w_out, rows, length, mask = ctx.saved_tensors
        ds = ds * mask  # padding slots pass nothing back
        dq = (ds.unsqueeze(-2) @ k_j).squeeze(-2)
        dk = _scatter(ds.unsqueeze(-1) * q.unsqueeze(2), rows)
        dw_out = _weight_grad(hidden, ds)
        dz = torch.outer(ds.reshape(-1), w_out).view_as(hidden).mul_(hidden > 0)
        da = dz.sum(2)
        db = _scatter(dz, rows)
        # Lengths shared by every example (N, K), or one scaffold per example (B, N, K).
        dw_len = _weight_grad(dz.sum(0) if length.dim() == 2 else dz, length)
        dh = dp = dw_err = None
        if diff is not None:
            dw_err = _weight_grad(dz, err)
            # d|x|/dx = x / |x|, and 0 at x = 0 (as torch.linalg.vector_norm's gradient).
            coef = (dz @ w_err).div_(torch.where(err > 0, err, 1)).unsqueeze(-1)
            dh_j = diff * coef
            dh = _scatter(dh_j, rows)
            dp = dh_j.sum(2).neg_()
        return dq, dk, da, db, dh, dp, dw_err, dw_len, dw_out, ds.sum(), None, None, None


class _GatedAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, keep, m, w_g, b_g, nbr):
        rows = _rows(nbr, *m.shape[:2])
        m_j = _gather(m, rows, nbr.shape[-1])
        gates = torch.addcmul(b_g, s.unsqueeze(-1), w_g).sigmoid_().mul_(keep.unsqueeze(-1))
        out = (gates * m_j).sum(2)
        ctx.save_for_backward(s, gates, m_j, w_g, rows)
        return out, gates.mean(-1)

    @staticmethod
    def backward(ctx, dout, dgm):
        s, gates, m_j, w_g, rows = ctx.saved_tensors
        dout = dout.unsqueeze(2)
        dm = _scatter(gates * dout, rows)
        dgates = (m_j * dout).add_(dgm.unsqueeze(-1), alpha=1 / gates.shape[-1])
        # d pre-activation = dgates * k g (1 - g), g the sigmoid; with k in {0, 1},
        # k g (1 - g) = kg (1 - kg): the kept gate serves for both factors.
        dpre = dgates.mul_(gates)
        dpre.addcmul_(dpre, gates, value=-1)
        return dpre @ w_g, None, dm, _weight_grad(dpre, s), dpre.sum((0, 1, 2)), None


def _dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The operands' promoted dtype (torch.promote_types only where they differ: it is an op too)."""
    dtypes = {t.dtype for t in tensors if t is not None}
    return dtypes.pop() if len(dtypes) == 1 else functools.reduce(torch.promote_types, dtypes)


def _as(dtype: torch.dtype, *tensors):
    """Each tensor in ``dtype`` (no op where it already is; None stays None)."""
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


# Both halves run in one dtype, the promotion of their operands (as the reference's ops
# promote), with autocast off inside: the hand-written backward then sees the dtypes its
# forward saved.
def edge_scores(q, k, a, b, h, p, w_err, w_len, w_out, b_out, sc: Scaffold) -> torch.Tensor:
    """``afmp.ops.edge.edge_scores`` in batched ops; padding slots score exactly 0."""
    dtype = _dtype(q, k, a, b, w_len, w_out, b_out, *((h, p, w_err) if p is not None else ()))
    args = _as(dtype, q, k, a, b, h, p, w_err, w_len, w_out, b_out, sc.length, sc.mask)
    with torch.autocast(q.device.type, enabled=False):
        return _EdgeScores.apply(*args[:10], sc.neighbors, *args[10:])


def gated_aggregate(s, keep, m, w_g, b_g, sc: Scaffold) -> tuple[torch.Tensor, torch.Tensor]:
    """``afmp.ops.edge.gated_aggregate`` in batched ops."""
    dtype = _dtype(s, m, w_g, b_g)
    s, keep, m, w_g, b_g = _as(dtype, s, keep.expand_as(s), m, w_g, b_g)
    with torch.autocast(s.device.type, enabled=False):
        return _GatedAggregate.apply(s, keep, m, w_g, b_g, sc.neighbors)
