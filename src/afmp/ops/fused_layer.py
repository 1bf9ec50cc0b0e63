"""A whole AFMP layer as one autograd op, its backward written out: what ``gather`` runs in a model.

At the grids people train on (4x4 to 16x16 tokens) a layer pays for every op it
dispatches (docs/results.md, "AFMP at the sizes people train"); on a GPU each is a
kernel launch. Through the two halves of the edge stage, autograd replays the layer's
small forward ops one by one. Here the layer of models/afmp.py,

    [h_self | m | q | k | a | b] = W h + c,    p = W_pred t + c_pred
    s_ij = (q_i U) . k_j + w_out . relu(a_i + b_j + len_ij w_len + |h_j - p_i| w_err) + b_out
    g_ij = sigmoid(w_g s_ij + b_g) * keep_ij,  out_i = gelu(h_self_i + sum_j g_ij * m_j)

is one ``autograd.Function``, computed as the gather backend computes the edge stage
(afmp.ops.gather_edge: every slot at once, one row gather per operand), with:

- top-k inside the forward, on the scores (it has no gradient), so that scores,
  pruning, gates and aggregate need no op boundary between them;
- the backward as a handful of batched ops: one ``index_add`` per gathered operand,
  the projection's gradient assembled in one ``cat`` and multiplied once;
- what every layer reads of the scaffold (row indices, mask and lengths in the working
  dtype) derived once per model forward (``prepare``);
- the backward writes its (B, N, K, C) gradients over the saved buffers it has read for
  the last time, instead of into fresh ones: on the CPU a fresh buffer of that size is
  mapped from the OS on every step and its first touch costs as much as the arithmetic.
  So the backward runs once per forward (a second, with ``retain_graph``, is refused).

It computes the reference's function (tests/test_fused_layer.py, and the model tests, in
float64 on every output and gradient). Memory is gather's: the forward keeps the gathered
rows, the MLP's hidden layer, the errors and the gates, (B, N, K, 2D + R + 2F), which is
why ``auto`` takes it on small grids only. Measured on a 2-core CPU at the mnist5k shape
(docs/results.md, "The whole layer as one op"): fewer ops and a faster step than the
two halves with autograd between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from afmp.ops.edge import LayerWeights, topk_keep
from afmp.ops.gather_edge import _as, _dtype, _rows, _scatter_rows, _weight_grad


@dataclass(frozen=True)
class Prepared:
    """What every layer of one forward reads of the scaffold, derived once."""

    rows: torch.Tensor  # (B*N*K,) each slot's neighbour, a row of the (B*N, C) batch
    mask: torch.Tensor  # bool (N, K) or (B, N, K): a real edge (top-k's input)
    keep: torch.Tensor  # mask in the working dtype, (..., K, 1): the dense case's keep
    length: torch.Tensor  # lengths in the working dtype, (..., K, 1)
    num_edges: int | torch.Tensor
    k: int


def prepare(sc, h: torch.Tensor) -> Prepared:
    """The scaffold's tensors as the fused layer reads them, for the batch of states ``h``."""
    dtype = h.dtype if h.dtype.is_floating_point else torch.get_default_dtype()
    return Prepared(
        rows=_rows(sc.neighbors, h.shape[0], h.shape[1]),
        mask=sc.mask,
        keep=sc.mask.unsqueeze(-1).to(dtype),
        length=sc.length.unsqueeze(-1).to(dtype),
        num_edges=sc.num_edges,
        k=sc.neighbors.shape[-1],
    )


class _Layer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, t, w, bias, U, w_len, w_pred, b_pred, w_err, w_out, b_out, w_g, b_g, prep, sparsity):
        batch, n, d = h.shape
        r, f, k = U.shape[0], w_len.shape[0], prep.k
        h2 = h.reshape(-1, d)
        y = torch.addmm(bias, h2, w.t())
        h_self, m, q, k_, a, b = y.split((d, d, r, r, f, f), 1)
        q = q.contiguous()  # a column block of y; its backward product is several times faster contiguous
        qu = q.mm(U)  # q_i U: the router's bilinear form on the token side
        # What neighbour j contributes, gathered for every slot; each gather's output is
        # contiguous (elementwise work on strided slices of one wide gather measured slower).
        m_j, k_j, b_j = (x.index_select(0, prep.rows).view(batch, n, k, -1) for x in (m, k_, b))
        z = torch.add(b_j, a.view(batch, n, 1, f)).addcmul_(prep.length, w_len)
        diff = err = t2 = None
        if t is not None:
            t2 = t.reshape(-1, d)
            p = torch.addmm(b_pred, t2, w_pred.t())
            diff = h2.index_select(0, prep.rows).view(batch, n, k, d).sub_(p.view(batch, n, 1, d))
            err = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
            z.addcmul_(err, w_err)
        hidden = z.relu_()
        bilinear = torch.bmm(k_j.view(batch * n, k, r), qu.view(batch * n, r, 1)).add_(b_out)
        s = torch.addmv(bilinear.view(-1), hidden.view(-1, f), w_out).view(batch, n, k)
        keep = prep.keep if sparsity <= 0 else topk_keep(s, prep.mask, prep.num_edges, sparsity).unsqueeze(-1)
        gates = torch.addcmul(b_g, s.unsqueeze(-1), w_g).sigmoid_().mul_(keep)
        pre = (gates * m_j).sum(2).add_(h_self.view(batch, n, d))
        ctx.save_for_backward(h2, t2, w, U, q, qu, m_j, k_j, hidden, diff, err, s, gates, pre)
        ctx.extras, ctx.consumed = (w_pred, w_err, w_out, w_g, prep), False
        return F.gelu(pre), gates.sum(-1).mul_(1 / d)  # the mean, in fewer dispatched ops

    @staticmethod
    def backward(ctx, dout, dgm):
        # The backward overwrites saved buffers it no longer needs (no fresh (B, N, K, C)
        # allocations), so it can run once per forward: a second backward through the same
        # graph (retain_graph=True) would read them overwritten, and is refused instead.
        if ctx.consumed:
            raise RuntimeError(
                "the gather backend's fused AFMP layer can run its backward once per forward "
                "(it reuses its saved buffers); use backend='reference' to backpropagate twice"
            )
        ctx.consumed = True
        h2, t2, w, U, q, qu, m_j, k_j, hidden, diff, err, s, gates, pre = ctx.saved_tensors
        w_pred, w_err, w_out, w_g, prep = ctx.extras
        batch, n, k, d = gates.shape
        r, f = U.shape[0], hidden.shape[-1]
        dpre = torch.ops.aten.gelu_backward(dout, pre).unsqueeze(2)  # (B, N, 1, D)
        rows = prep.rows
        # Gates and aggregate. The kept gate kg serves for both factors of k g (1 - g), k in {0, 1}.
        # Saved buffers are overwritten once read for the last time (m_j, gates, k_j, hidden, diff).
        dact = m_j.mul_(dpre).add_(dgm.unsqueeze(-1), alpha=1 / d).mul_(gates)
        dact.addcmul_(dact, gates, value=-1)
        dm = _scatter_rows(gates.mul_(dpre), rows)
        ds = dact.view(-1, d).mv(w_g).view(batch, n, k, 1)  # 0 where no gate was kept (pruned, padding)
        dw_g = _weight_grad(dact, s)
        db_g = dact.sum((0, 1, 2))
        # Scores.
        dqu = torch.bmm(ds.view(batch * n, 1, k), k_j.view(batch * n, k, r)).view(-1, r)
        dk = _scatter_rows(torch.mul(ds, qu.view(batch, n, 1, r), out=k_j), rows)
        dw_out = _weight_grad(hidden, ds)
        # relu's backward, over the hidden layer: sign(relu(z)) is its mask.
        dz = hidden.sign_().mul_(ds).mul_(w_out)
        db = _scatter_rows(dz, rows)
        # Lengths shared by every example (N, K, 1), or one scaffold per example (B, N, K, 1).
        dw_len = _weight_grad(dz.sum(0) if prep.length.dim() == 3 else dz, prep.length)
        # The projection's gradient, [self | m | q | k | a | b] per token.
        dy = torch.cat([dpre.view(-1, d), dm, dqu.mm(U.t()), dk, dz.sum(2).view(-1, f), db], 1)
        dh = dy.mm(w)
        dt = dw_pred = db_pred = dw_err = None
        if diff is not None:
            dw_err = _weight_grad(dz, err)
            # d|x|/dx = x / |x|, and 0 at x = 0 (as torch.linalg.vector_norm's gradient).
            coef = (dz @ w_err).unsqueeze(-1).div_(torch.where(err > 0, err, 1))
            dh_j = diff.mul_(coef)  # diff is not needed again
            dh.index_add_(0, rows, dh_j.view(-1, d))
            dp = dh_j.sum(2).neg_().view(-1, d)
            dt = dp.mm(w_pred).view(batch, n, d)
            dw_pred, db_pred = dp.t().mm(t2), dp.sum(0)
        dU = q.t().mm(dqu)
        dw = dy.t().mm(h2)
        dbias = dy.sum(0)
        grads = (dh.view(batch, n, d), dt, dw, dbias, dU, dw_len, dw_pred, db_pred, dw_err, dw_out)
        return *grads, ds.sum(), dw_g, db_g, None, None


def layer(h: torch.Tensor, t: torch.Tensor | None, weights: LayerWeights, prep: Prepared, sparsity: float):
    """One AFMP layer: (new states (B, N, D), gate means (B, N, K), exactly 0 where not kept)."""
    dtype = _dtype(h, *(x for x in weights if x is not None), t)
    args = _as(dtype, h, t, *weights)
    with torch.autocast(h.device.type, enabled=False):
        return _Layer.apply(*args, prep, sparsity)
