"""AFMP's per-edge stage on a token grid as a stencil: shifted views, no index lists.

Same function as ``afmp.ops.edge`` (the padded-list reference) on a scaffold whose slot
s is the grid offset ``o = offsets[s]`` for every token (``Scaffold.stencil``). The
per-token tensors are viewed as (B, H, W, C) grids and padded once by the stencil's
radius; the neighbour of every token at offset o is then one strided view of the padded
grid, ``x_o[y, x] = x[y + dy, x + dx]``. Per offset, the stage is elementwise work on
such views (letters as in ``afmp.ops.edge``):

    e_o = |h_o - p|,  z_o = a + b_o + len_o w_len + e_o w_err,  s_o = q . k_o + w_out . relu(z_o) + b_out
    g_o = sigmoid(w_g s_o + b_g) * keep_o,  out = sum_o g_o * m_o

The backward is written by hand, offset by offset: a gradient that the forward sent
from the neighbour's view ``x_o`` goes back into the view at o of a padded gradient
buffer (the adjoint of a shift is the opposite shift), never through a scatter. Only
the inputs and the (B, N, K) scores and errors are kept for it; gates and the MLP's
hidden layer are recomputed, so no (B, N, K, D) tensor exists forward or backward.

Padding slots (off the grid, or an edge the layout lacks) score exactly 0 and pass no
gradient, as in the packed backend; their gates are 0 through ``keep``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afmp.scaffold import Scaffold, Stencil


def scaffold_why_not(sc: Scaffold) -> str | None:
    return None if sc.stencil is not None else "the scaffold is not a stencil on a token grid"


# -- shifted views -----------------------------------------------------------------------
def _grid(st: Stencil, x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, H, W, C)."""
    return x.unflatten(1, (st.height, st.width))


def _padded(st: Stencil, x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, H + 2r, W + 2r, C), zeros around the grid (r: the stencil's radius)."""
    r = st.radius
    return F.pad(_grid(st, x), (0, 0, r, r, r, r))


def _zeros_padded(st: Stencil, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A padded gradient buffer for ``like`` (B, N, C)."""
    r = st.radius
    return like.new_zeros((like.shape[0], st.height + 2 * r, st.width + 2 * r, like.shape[-1]), dtype=dtype)


def _at(st: Stencil, padded: torch.Tensor, slot: int) -> torch.Tensor:
    """Every token's neighbour at offset ``offsets[slot]``: a (B, H, W, C) view of ``padded``."""
    dy, dx = st.offsets[slot]
    y, x = st.radius + dy, st.radius + dx
    return padded[:, y : y + st.height, x : x + st.width]


def _inner(st: Stencil, padded: torch.Tensor) -> torch.Tensor:
    """(B, H + 2r, W + 2r, C) -> (B, N, C): the grid without its halo."""
    r = st.radius
    return padded[:, r : r + st.height, r : r + st.width].flatten(1, 2)


def _stencil(sc: Scaffold) -> Stencil:
    if sc.stencil is None:
        raise ValueError("the stencil backend needs a scaffold on a token grid (Scaffold.stencil)")
    return sc.stencil


def _workspace(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A buffer shaped like ``like`` that every offset reuses: on the CPU, a fresh multi-MB
    tensor per offset costs more in page faults than the elementwise op that fills it."""
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums over offsets run in at least float32, as the reference's reductions do."""
    return torch.promote_types(dtype, torch.float32)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B*H*W, C) for weight gradients as one matrix-vector product."""
    return x.reshape(-1, x.shape[-1])


# -- scores --------------------------------------------------------------------------------
def _hidden(st, slot, a, b_pad, err, w_err, w_len):
    """z_o = a + b_o + len_o w_len (+ e_o w_err): the score MLP's hidden layer at one offset."""
    z = torch.add(a, _at(st, b_pad, slot)).add_(w_len, alpha=st.lengths[slot])
    if err is not None:
        z.addcmul_(err[..., slot, None], w_err)
    return z


class _EdgeScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, a, b, h, p, w_err, w_len, w_out, b_out, mask, st):
        dtype = torch.promote_types(q.dtype, a.dtype)  # the weights follow the activations
        q4, a4 = _grid(st, q), _grid(st, a)
        k_pad, b_pad = _padded(st, k), _padded(st, b)
        w_len_, w_out_ = w_len.to(a.dtype), w_out.to(a.dtype)
        batch, n_offsets = q.shape[0], len(st.offsets)
        err = w_err_ = None
        if p is not None:
            h_pad, p4 = _padded(st, h), _grid(st, p)
            diff = _workspace(p4, torch.promote_types(h.dtype, p.dtype))
            err = torch.stack(
                [
                    torch.linalg.vector_norm(torch.sub(_at(st, h_pad, s), p4, out=diff), dim=-1)
                    for s in range(n_offsets)
                ],
                -1,
            ).to(a.dtype)
            w_err_ = w_err.to(a.dtype)
        scores = q.new_empty((batch, st.height, st.width, n_offsets), dtype=dtype)
        for s in range(n_offsets):
            bilinear = (q4 * _at(st, k_pad, s)).sum(-1)
            z = _hidden(st, s, a4, b_pad, err, w_err_, w_len_)
            scores[..., s] = bilinear + z.relu_() @ w_out_
        scores = scores.flatten(1, 2).add_(b_out).mul_(mask)
        ctx.st = st
        ctx.save_for_backward(q, k, a, b, h, p, w_err, w_len, w_out, b_out, mask, err)
        return scores

    @staticmethod
    def backward(ctx, ds):
        q, k, a, b, h, p, w_err, w_len, w_out, b_out, mask, err = ctx.saved_tensors
        dq, dk, da, db, dh, dp, dw_err, dw_len, dw_out = _scores_backward(
            ctx.st, _grid(ctx.st, (ds * mask).to(a.dtype)), q, k, a, b, h, p, w_err, w_len, w_out, err
        )

        def out(grad, like):
            return None if grad is None else grad.reshape(like.shape).to(like.dtype)

        return (
            out(dq, q),
            out(dk, k),
            out(da, a),
            out(db, b),
            out(dh, h),
            out(dp, p),
            out(dw_err, w_err),
            out(dw_len, w_len),
            out(dw_out, w_out),
            out((ds * mask).sum(), b_out),
            None,
            None,
        )


def _scores_backward(st, ds4, q, k, a, b, h, p, w_err, w_len, w_out, err):
    """Gradients of the scores, offset by offset, accumulated in place (padded buffers for
    what goes back to the neighbours). ``ds4``: (B, H, W, K), 0 in padding slots."""
    acc = _accumulation_dtype(q.dtype)
    q4, a4 = _grid(st, q), _grid(st, a)
    k_pad, b_pad = _padded(st, k), _padded(st, b)
    w_len, w_out = w_len.to(a.dtype), w_out.to(a.dtype)
    w_err = w_err.to(a.dtype) if p is not None else None
    dq = torch.zeros(q4.shape, dtype=acc, device=q.device)
    dk_pad = _zeros_padded(st, k, acc)
    da = torch.zeros(a4.shape, dtype=acc, device=a.device)
    db_pad = _zeros_padded(st, b, acc)
    dw_out = torch.zeros(w_out.shape, dtype=acc, device=q.device)
    dw_len = torch.zeros(w_len.shape, dtype=acc, device=q.device)
    dh = dp = dw_err = None
    if p is not None:
        h_pad, p4 = _padded(st, h), _grid(st, p)
        diff = _workspace(p4, torch.promote_types(h.dtype, p.dtype))
        dh_pad = _zeros_padded(st, h, acc)
        dp = torch.zeros(p4.shape, dtype=acc, device=p.device)
        dw_err = torch.zeros(w_err.shape, dtype=acc, device=q.device)
    for s in range(len(st.offsets)):
        g = ds4[..., s, None]  # (B, H, W, 1)
        dq.addcmul_(g, _at(st, k_pad, s))
        _at(st, dk_pad, s).addcmul_(g, q4)
        z = _hidden(st, s, a4, b_pad, err, w_err, w_len)
        dw_out += _flat(z.relu()).T @ _flat(g).squeeze(1)
        dz = torch.where(z > 0, g * w_out, 0)
        da += dz
        _at(st, db_pad, s).add_(dz)
        dw_len += dz.sum((0, 1, 2)) * st.lengths[s]
        if p is not None:
            e = err[..., s]
            dw_err += _flat(dz).T @ e.reshape(-1)
            # d|x|/dx = x / |x|, 0 at x = 0 (as torch.linalg.vector_norm's gradient)
            coef = ((dz @ w_err) / torch.where(e > 0, e, 1))[..., None]
            torch.sub(_at(st, h_pad, s), p4, out=diff)
            _at(st, dh_pad, s).addcmul_(coef, diff)
            dp.addcmul_(coef, diff, value=-1)
    if p is not None:
        dh = _inner(st, dh_pad)
    return dq, _inner(st, dk_pad), da, _inner(st, db_pad), dh, dp, dw_err, dw_len, dw_out


def edge_scores(q, k, a, b, h, p, w_err, w_len, w_out, b_out, sc: Scaffold) -> torch.Tensor:
    """``afmp.ops.edge.edge_scores`` on shifted views; padding slots score exactly 0."""
    return _EdgeScores.apply(q, k, a, b, h, p, w_err, w_len, w_out, b_out, sc.mask, _stencil(sc))


# -- gated aggregation ---------------------------------------------------------------------
def _sigmoid_gate(s4, slot, w_g, b_g, out):
    """sigmoid(w_g s_o + b_g), (B, H, W, D), before the keep mask, written into ``out``."""
    return torch.addcmul(b_g, s4[..., slot, None], w_g, out=out).sigmoid_()


class _GatedAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, keep, m, w_g, b_g, st):
        dtype = torch.promote_types(torch.promote_types(s.dtype, w_g.dtype), m.dtype)
        s4, kept = _grid(st, s.to(dtype)), _grid(st, keep.to(dtype))
        m_pad = _padded(st, m.to(dtype))
        w_g_, b_g_ = w_g.to(dtype), b_g.to(dtype)
        out = torch.zeros((*s4.shape[:3], m.shape[-1]), dtype=_accumulation_dtype(dtype), device=m.device)
        gate_mean = torch.empty_like(s4)
        gate = _workspace(out, dtype)
        for slot in range(len(st.offsets)):
            _sigmoid_gate(s4, slot, w_g_, b_g_, gate).mul_(kept[..., slot, None])
            gate_mean[..., slot] = gate.mean(-1)
            out.addcmul_(gate, _at(st, m_pad, slot))
        ctx.st = st
        ctx.save_for_backward(s, keep, m, w_g, b_g)
        return out.flatten(1, 2).to(dtype), gate_mean.flatten(1, 2)

    @staticmethod
    def backward(ctx, dout, dgm):
        s, keep, m, w_g, b_g = ctx.saved_tensors
        dtype = torch.promote_types(torch.promote_types(s.dtype, w_g.dtype), m.dtype)
        st = ctx.st
        ds, dm, dw_g, db_g = _aggregate_backward(
            st,
            _grid(st, s.to(dtype)),
            _grid(st, keep.to(dtype)),
            m.to(dtype),
            w_g.to(dtype),
            b_g.to(dtype),
            _grid(st, dout.to(dtype)),
            _grid(st, dgm.to(dtype)),
        )
        return (
            ds.flatten(1, 2).to(s.dtype),
            None,
            dm.to(m.dtype),
            dw_g.to(w_g.dtype),
            db_g.to(b_g.dtype),
            None,
        )


def _aggregate_backward(st, s4, kept, m, w_g, b_g, dout4, dgm4):
    """Gradients of the gated sum, offset by offset: the gates are recomputed, never stored."""
    acc = _accumulation_dtype(m.dtype)
    d = m.shape[-1]
    m_pad = _padded(st, m)
    dm_pad = _zeros_padded(st, m, acc)
    ds = torch.zeros_like(s4)
    dw_g = torch.zeros(d, dtype=acc, device=m.device)
    db_g = torch.zeros(d, dtype=acc, device=m.device)
    gate, dpre = _workspace(dout4, m.dtype), _workspace(dout4, m.dtype)
    for slot in range(len(st.offsets)):
        _sigmoid_gate(s4, slot, w_g, b_g, gate).mul_(kept[..., slot, None])
        _at(st, dm_pad, slot).addcmul_(gate, dout4)
        # d pre-activation = (dout * m_o + dgm_o / D) * k g (1 - g); with k in {0, 1},
        # k g (1 - k g) = k g (1 - g), so the kept gate serves for both factors.
        torch.addcmul(dgm4[..., slot, None] / d, dout4, _at(st, m_pad, slot), out=dpre).mul_(gate)
        dpre.addcmul_(dpre, gate, value=-1)
        ds[..., slot] = dpre @ w_g
        # Matrix-vector products: a (B*H*W, D)^T @ (B*H*W, 2) matmul is 10x slower on the CPU.
        dw_g += _flat(dpre).T @ s4[..., slot].reshape(-1)
        db_g += dpre.sum((0, 1, 2))
    return ds, _inner(st, dm_pad), dw_g, db_g


def gated_aggregate(s, keep, m, w_g, b_g, sc: Scaffold) -> tuple[torch.Tensor, torch.Tensor]:
    """``afmp.ops.edge.gated_aggregate`` on shifted views."""
    return _GatedAggregate.apply(s, keep.expand_as(s), m, w_g, b_g, _stencil(sc))
