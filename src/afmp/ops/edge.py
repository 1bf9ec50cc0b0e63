"""AFMP's per-edge stage, in plain PyTorch (the reference every fast backend is tested against).

Letters: B batch, N tokens, K neighbour slots, D channels, R router rank (k_dim),
F hidden width of the score MLP v. Every backend takes the scaffold (afmp.scaffold)
as its last argument and uses what it needs of it; the reference reads its (N, K)
neighbour lists ``nbr`` and edge lengths (``padded_edge_scores`` and
``padded_gated_aggregate`` take those two alone, for callers that hold no scaffold).

Everything linear was already applied per token (see models/afmp.py), so per edge
i <- j only gathers and does O(R + F + D) elementwise work:

    e_ij = |h_j - p_i|                                   (0 when there is no p)
    s_ij = q_i . k_j + w2 . relu(a_i + b_j + c e_ij + d len_ij) + b2
    g_ij = sigmoid(w_g s_ij + b_g) * keep_ij             (a D-vector)
    out_i = sum_j g_ij * m_j,  gate_mean_ij = mean_D g_ij

This eager version materialises (B, N, K, D) tensors; that is what fused kernels avoid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from afmp.scaffold import Scaffold


def gather_neighbours(x: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """(B, N, C) per-token rows -> (B, N, K, C) rows of each token's neighbours.

    ``nbr`` is (N, K), the same lists for every example (same values as ``x[:, nbr]``), or
    (B, N, K) rows of the flattened (B*N, C) batch, one scaffold per example (point sets,
    afmp.models.points). index_select's backward is an index_add, which on the CPU is
    about twice as fast as the accumulating index_put behind advanced indexing.
    """
    if nbr.dim() == 3:
        return x.reshape(-1, x.shape[-1]).index_select(0, nbr.reshape(-1)).view(*nbr.shape, x.shape[-1])
    return x.index_select(1, nbr.reshape(-1)).unflatten(1, nbr.shape)


def edge_scores(q, k, a, b, h, p, w_err, w_len, w_out, b_out, sc: Scaffold) -> torch.Tensor:
    """Routing scores s (B, N, K); padding slots get a finite but meaningless score."""
    return padded_edge_scores(q, k, a, b, h, p, w_err, w_len, w_out, b_out, sc.neighbors, sc.length)


def gated_aggregate(s, keep, m, w_g, b_g, sc: Scaffold) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_j g_ij * m_j  (B, N, D),  mean_D g_ij  (B, N, K), exactly 0 where not kept)."""
    return padded_gated_aggregate(s, keep, m, w_g, b_g, sc.neighbors)


def padded_edge_scores(
    q: torch.Tensor,  # (B, N, R)
    k: torch.Tensor,  # (B, N, R)
    a: torch.Tensor,  # (B, N, F)  i-side of v's first layer, bias included
    b: torch.Tensor,  # (B, N, F)  j-side of v's first layer
    h: torch.Tensor,  # (B, N, D)  states, for the prediction error
    p: torch.Tensor | None,  # (B, N, D)  predictions W_pred t_i, or None on the first layer
    w_err: torch.Tensor | None,  # (F,), None exactly when p is None
    w_len: torch.Tensor,  # (F,)
    w_out: torch.Tensor,  # (F,)
    b_out: torch.Tensor,  # ()
    nbr: torch.Tensor,  # (N, K) long
    length: torch.Tensor,  # (N, K)
) -> torch.Tensor:
    """``edge_scores`` on neighbour lists ``nbr`` and their lengths."""
    bilinear = (q.unsqueeze(2) * gather_neighbours(k, nbr)).sum(-1)
    hidden = a.unsqueeze(2) + gather_neighbours(b, nbr) + length.unsqueeze(-1).to(a.dtype) * w_len
    if p is not None:
        err = torch.linalg.vector_norm(gather_neighbours(h, nbr) - p.unsqueeze(2), dim=-1)
        hidden = hidden + err.unsqueeze(-1) * w_err
    return bilinear + F.relu(hidden) @ w_out + b_out


def padded_gated_aggregate(
    s: torch.Tensor,  # (B, N, K) scores
    keep: torch.Tensor,  # (B, N, K) bool: a real edge that survived pruning
    m: torch.Tensor,  # (B, N, D) messages W_msg h_j
    w_g: torch.Tensor,  # (D,)
    b_g: torch.Tensor,  # (D,)
    nbr: torch.Tensor,  # (N, K)
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gated_aggregate`` on neighbour lists ``nbr``."""
    gates = torch.sigmoid(s.unsqueeze(-1) * w_g + b_g) * keep.unsqueeze(-1).to(s.dtype)
    out = (gates * gather_neighbours(m, nbr)).sum(2)
    return out, gates.mean(-1)


def topk_keep(
    s: torch.Tensor, mask: torch.Tensor, num_edges: int | torch.Tensor, sparsity: float
) -> torch.Tensor:
    """Per image, keep the highest-scoring ``1 - sparsity`` of the ``num_edges`` valid edges.

    Exactly ``num_edges - round(sparsity * num_edges)`` edges survive in every image;
    the threshold is never shared across the batch. ``num_edges`` is a Python int
    (``mask.sum()``, known when the scaffold is built) so compilation sees a constant, or
    a (B,) tensor when every example has a scaffold of its own (point sets).
    """
    if sparsity <= 0:
        return mask.expand_as(s)
    if isinstance(num_edges, torch.Tensor):
        return _topk_keep_per_example(s, mask, num_edges, sparsity)
    n_keep = num_edges - round(sparsity * num_edges)
    flat = s.detach().masked_fill(~mask, float("-inf")).flatten(1)
    idx = flat.topk(n_keep, dim=1, sorted=False).indices
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return keep.view_as(s)


def _topk_keep_per_example(s, mask, num_edges: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``topk_keep`` with example b keeping ``E_b - round(sparsity * E_b)`` of its E_b edges.

    One descending sort of each example's scores; the first n_keep_b positions survive.
    (torch.round rounds half to even, as Python's round does for the int case.)
    """
    n_keep = num_edges - torch.round(sparsity * num_edges.double()).long()
    flat = s.detach().masked_fill(~mask, float("-inf")).flatten(1)
    order = flat.argsort(dim=1, descending=True)
    survives = torch.arange(flat.shape[1], device=s.device) < n_keep.unsqueeze(1)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, survives)
    return keep.view_as(s)


class LayerWeights(NamedTuple):
    """One AFMP layer's parameters (models/afmp.py's RouterPCULayer), as a layer op takes them."""

    proj_w: torch.Tensor  # (2D + 2R + 2F, D): [W_self | W_msg | W_q | W_k | A | B]
    proj_b: torch.Tensor
    U: torch.Tensor  # (R, R)
    w_len: torch.Tensor  # (F,)
    pred_w: torch.Tensor | None  # (D, D); None on the first layer, which has no prediction
    pred_b: torch.Tensor | None
    w_err: torch.Tensor | None  # (F,)
    w_out: torch.Tensor  # (F,)
    b_out: torch.Tensor  # ()
    w_g: torch.Tensor  # (D,)
    b_g: torch.Tensor  # (D,)


def layer_of(edge_scores: Callable, gated_aggregate: Callable) -> Callable:
    """One AFMP layer around a backend's two halves of the edge stage: the projections, the
    scores, per-image top-k, the gated aggregate and the PCU update (docs/model.md).

    ``layer(h, t, weights, sc, sparsity)`` -> (new states (B, N, D), gate means (B, N, K)),
    ``t`` the predictive signal or None. Every linear map acts on one endpoint of an edge,
    so one wide GEMM computes ``[W_self | W_msg | W_q | W_k | A | B] h`` for every token.
    """

    def layer(h, t, w: LayerWeights, sc, sparsity: float):
        d, r, f = h.shape[-1], w.U.shape[0], w.w_len.shape[0]
        h_self, m, q, k, a, b = F.linear(h, w.proj_w, w.proj_b).split((d, d, r, r, f, f), dim=-1)
        p = None if t is None else F.linear(t, w.pred_w, w.pred_b)
        s = edge_scores(q @ w.U, k, a, b, h, p, w.w_err, w.w_len, w.w_out, w.b_out, sc)
        keep = topk_keep(s, sc.mask, sc.num_edges, sparsity)
        agg, gate_mean = gated_aggregate(s, keep, m, w.w_g, w.b_g, sc)
        return F.gelu(h_self + agg), gate_mean

    return layer
