"""AFMP's per-edge stage over the real edges only, in plain PyTorch (the CPU's default).

Same function as ``afmp.ops.edge``, which works on all N*K padded slots. A scaffold's
lists are padded to its largest degree, so on small grids many slots are padding (a
4x4 Delaunay grid has K = 8 and 66 real edges in 128 slots). Here the stage runs on
the E real edges, as flat (B, E, .) tensors shared by every image of the batch, and
scatters the per-edge results back to the (B, N, K) slots the model and top-k expect:

    slots  (E,)  flat index i*K + s of each real edge's slot (the scaffold's ``slots``)
    dst    (E,)  i, the token the edge i <- j brings a message to
    src    (E,)  j, the token it brings the message from

Messages are summed into their token with ``index_add`` (whose backward is a gather),
never with advanced indexing (whose backward is an accumulating ``index_put``, slower
on the CPU). Padding slots come out as 0: a score of 0, a gate of exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def edge_list(nbr: torch.Tensor, slots: torch.Tensor | None = None):
    """(slots, dst, src) of the real edges of padded lists ``nbr`` (N, K).

    ``slots`` as the scaffold stores it; without it, found from the padding convention
    (a padding slot points at its own token), which costs a data-dependent nonzero.
    """
    if slots is None:
        own = torch.arange(nbr.shape[0], device=nbr.device).unsqueeze(1)
        slots = (nbr != own).flatten().nonzero().squeeze(1)
    return slots, slots // nbr.shape[1], nbr.flatten().index_select(0, slots)


def _to_slots(per_edge: torch.Tensor, slots: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """(B, E) per-edge values into (B, N, K) slots, 0 in padding."""
    batch = per_edge.shape[0]
    full = per_edge.new_zeros(batch, nbr.numel()).index_copy(1, slots, per_edge)
    return full.view(batch, *nbr.shape)


def edge_scores(q, k, a, b, h, p, w_err, w_len, w_out, b_out, sc):
    """``afmp.ops.edge.edge_scores`` on the real edges; padding slots score 0."""
    nbr, length = sc.neighbors, sc.length
    slots, dst, src = edge_list(nbr, sc.slots)
    bilinear = (q.index_select(1, dst) * k.index_select(1, src)).sum(-1)
    edge_length = length.flatten().index_select(0, slots).to(a.dtype)
    hidden = a.index_select(1, dst) + b.index_select(1, src) + edge_length.unsqueeze(-1) * w_len
    if p is not None:
        err = torch.linalg.vector_norm(h.index_select(1, src) - p.index_select(1, dst), dim=-1)
        hidden = hidden + err.unsqueeze(-1) * w_err
    return _to_slots(bilinear + F.relu(hidden) @ w_out + b_out, slots, nbr)


def gated_aggregate(s, keep, m, w_g, b_g, sc):
    """``afmp.ops.edge.gated_aggregate`` on the real edges."""
    nbr = sc.neighbors
    slots, dst, src = edge_list(nbr, sc.slots)
    s_edge = s.flatten(1).index_select(1, slots)
    keep_edge = keep.flatten(1).index_select(1, slots).to(s.dtype)
    gates = torch.sigmoid(s_edge.unsqueeze(-1) * w_g + b_g) * keep_edge.unsqueeze(-1)
    messages = gates * m.index_select(1, src)
    out = messages.new_zeros(m.shape[0], m.shape[1], messages.shape[-1]).index_add(1, dst, messages)
    return out, _to_slots(gates.mean(-1), slots, nbr)
