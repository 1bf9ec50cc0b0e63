"""Triton kernels for AFMP's per-edge stage on a token grid, forward and backward (backend ``triton``).

Same function as ``afmp.ops.stencil_edge`` (and so as the reference ``afmp.ops.edge``) on
a scaffold that is a stencil: slot s of every token (y, x) is its neighbour at the grid
offset ``offsets[s] = (dy, dx)``, token (y + dy, x + dx), where that is on the grid and
the scaffold's ``mask`` (N, K) has the edge (a layout may lack some inside the grid,
e.g. ``delaunay_qhull``). The kernels find neighbours by address arithmetic: no index
list is ever loaded.

Tiling. A program takes a tile of BT consecutive tokens of one image (a row-major token
range, rows of the grid or parts of them) and loops over the stencil's slots; the
offsets and their lengths are compile-time constants (``tl.constexpr`` tuples, one
compilation per stencil), so the slot loops unroll and every neighbour address is
``token + dy * W + dx``. The channels R and F are small and whole in one tile; the
model width D is looped over in chunks of BD. Per edge nothing wider than a scalar is
written: the forward writes the scores s and the prediction errors e (B, N, K, e in
fp32), and the backward recomputes the gates and the score MLP's hidden layer.

Backward, pull-style, no atomics: a program computes the gradients of its own tokens
only. Those of the i-side (dq, da, dp, ds) come from its tokens' own edges; those of
the j-side (dk, db, dh, dm) from the edges that point at them: the neighbour at slot s
of token i = j - offsets[s] is j, so the edge (i, s) is read back through the opposite
offset. Weight gradients are per-program partial sums (a program loops over several
token tiles), summed afterwards. Everything accumulates in fp32. An edge's hidden layer
and gate are thus computed twice, once by the program of each of its ends.

Padding slots (off the grid, or an edge the layout lacks) score exactly 0 and pass no
gradient; a gate is exactly 0 where its edge is not kept or is padding (``keep`` is
meant to lie within ``mask``, as ``topk_keep``'s does).

The kernels are wrapped as ``torch.library`` custom ops (``afmp::edge_scores``,
``afmp::gated_aggregate`` and their backwards) with fake implementations, so
torch.compile traces a model through them without graph breaks; the stencil reaches
them as plain ints and floats (grid height and width, flattened offsets, lengths).
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from afmp.environment import triton_interpreted
from afmp.ops import stencil_edge
from afmp.ops.backends import triton_why_not
from afmp.scaffold import Scaffold

# The interpreter is chosen when a kernel is defined, so read the flag at import time.
INTERPRETED = triton_interpreted()
# Launch knobs, read at each call: tokens per program (BLOCK_T) and channels of D per
# chunk (BLOCK_D) for the forward and the backward kernels, backward programs per
# launch (each loops over the token tiles left; its weight partials are one row), warps.
# Chosen without a GPU, from compiling for sm_90: no register spills at K = 6 and 8
# (at K = 24, window radius 2, the backward kernels spill); scripts/gpu_edge_check.py
# sweeps them on a GPU.
BLOCK_T = 32
BLOCK_D = 64
NUM_WARPS = 8
BWD_BLOCK_T = 16
BWD_BLOCK_D = 64
BWD_PROGRAMS = 16384
BWD_NUM_WARPS = 8


# -- kernel helpers ----------------------------------------------------------------------
# Which edges at a slot _edge finds for a tile: its tokens' own, or those pointing at them.
OUTGOING = tl.constexpr(0)
INCOMING = tl.constexpr(1)


@triton.jit
def _tile(tile_id, BT: tl.constexpr, N, W):
    """A tile's tokens, their grid row and column, and which exist (the last tile is ragged)."""
    tok = tile_id * BT + tl.arange(0, BT)
    return tok, tok // W, tok % W, tok < N


@triton.jit
def _edge(
    mask, tok, y, x, tok_ok, slot: tl.constexpr, DY: tl.constexpr, DX: tl.constexpr, H, W, K,
    DIRECTION: tl.constexpr,
):  # fmt: skip
    """The edges at ``slot`` that touch the tile's tokens: the token at grid offset (DY, DX)
    from each, and whether the edge exists (that token on the grid, and the layout has the
    edge: ``mask`` may lack some inside the grid).

    Outgoing, (DY, DX) = offsets[slot]: the edges (tok, slot), to j = tok + (DY, DX).
    Incoming, (DY, DX) = -offsets[slot]: the edges (i, slot) that point at tok, from
    i = tok + (DY, DX); their mask entry is i's. (One flat function: under Triton's
    interpreter, the tests' CPU path, every nested jit call costs about a millisecond.)
    """
    other = tok + DY * W + DX
    ok = tok_ok  # only the sides the offset points to can be off the grid
    if DY > 0:
        ok = ok & (y + DY < H)
    if DY < 0:
        ok = ok & (y + DY >= 0)
    if DX > 0:
        ok = ok & (x + DX < W)
    if DX < 0:
        ok = ok & (x + DX >= 0)
    if DIRECTION == INCOMING:
        ok = ok & (tl.load(mask + other * K + slot, mask=ok, other=0) != 0)
    else:
        ok = ok & (tl.load(mask + tok * K + slot, mask=ok, other=0) != 0)
    return other, ok


@triton.jit
def _rows(ptr, base, stride, tok, ok, cols, n_cols):
    """x[tok, cols] of one image as a float32 [BT, C] tile; 0 where not ok or past n_cols."""
    ptrs = ptr + base + tok.to(tl.int64)[:, None] * stride + cols[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (cols < n_cols)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _weights(ptr, cols, n_cols, BT: tl.constexpr):
    """A weight vector's entries ``cols`` as a float32 [BT, C] tile, every row the same.

    Loaded as a tile (row stride 0), not as a vector broadcast later: it then shares the
    layout of the activations' tiles it meets. From a vector, the compiler gave the gates
    a second layout and computed every sigmoid twice, in twice the registers (sm_90).
    """
    rows = tl.arange(0, BT)
    ptrs = ptr + rows[:, None] * 0 + cols[None, :]
    return tl.load(ptrs, mask=(rows >= 0)[:, None] & (cols < n_cols)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _at_edge(ptr, base, owner, slot: tl.constexpr, K: tl.constexpr, ok):
    """A (B, N, K) per-edge value at (owner, slot) in float32; 0 where not ok."""
    return tl.load(ptr + base + owner.to(tl.int64) * K + slot, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _column(tile, slots, slot: tl.constexpr):
    """Column ``slot`` of a [BT, KP] tile."""
    return tl.sum(tl.where(slots[None, :] == slot, tile, 0.0), axis=1)


@triton.jit
def _add_column(tile, slots, slot: tl.constexpr, col):
    """A [BT, KP] tile with ``col`` added to its column ``slot``."""
    return tile + tl.where(slots[None, :] == slot, col[:, None], 0.0)


@triton.jit
def _cast(x, ptr):
    """``x`` in the dtype ``ptr`` points at (stores round once, from the fp32 accumulator)."""
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _store_rows(ptr, base, tok, ok, x, cols, n_cols):
    """Store a [BT, C] tile at rows ``tok`` of a contiguous (B, N, n_cols) tensor."""
    ptrs = ptr + base + tok.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(ptrs, _cast(x, ptr), mask=ok[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _store_edges(ptr, base, tok, tok_ok, x, slots, K: tl.constexpr):
    """Store a [BT, KP] tile of per-edge values of a (B, N, K) tensor."""
    ptrs = ptr + base + tok.to(tl.int64)[:, None] * K + slots[None, :]
    tl.store(ptrs, _cast(x, ptr), mask=tok_ok[:, None] & (slots < K)[None, :])


@triton.jit
def _gates(
    scores, edges, keep, keep_base, skpN, skpK, owner, slot: tl.constexpr, K: tl.constexpr, ok, wg, bg, dd, D
):
    """The gates of the edges (owner, slot), a [BT, BD] chunk, and their scores s [BT]:
    keep * sigmoid(w_g s + b_g), 0 where the edge is not kept, does not exist, or past D."""
    sv = tl.load(scores + edges + owner.to(tl.int64) * K + slot, mask=ok, other=0.0).to(tl.float32)
    kept = ok & (tl.load(keep + keep_base + owner * skpN + slot * skpK, mask=ok, other=0) != 0)
    g = tl.sigmoid(sv[:, None] * wg + bg)
    return tl.where(kept[:, None] & (dd < D)[None, :], g, 0.0), sv


# -- scores ------------------------------------------------------------------------------
@triton.jit
def _scores_fwd_kernel(
    q, k, a, b, h, p, w_err, w_len, w_out, b_out, mask, s_out, err_out,
    N, H, W, R, F, D,
    sqB, sqN, skB, skN, saB, saN, sbB, sbN, shB, shN, spB, spN,
    OFFSETS: tl.constexpr, LENGTHS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    HAS_P: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr, FP: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    bi = tl.program_id(1).to(tl.int64)
    tok, y, x, tok_ok = _tile(tl.program_id(0), BT, N, W)
    slots = tl.arange(0, KP)
    rr = tl.arange(0, RP)
    ff = tl.arange(0, FP)

    # The prediction errors |h_j - p_i| first: each is a sum over every chunk of D, and the
    # score MLP needs it whole. p_i's chunk is read once for all slots.
    err = tl.zeros((BT, KP), dtype=tl.float32)
    if HAS_P:
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            p_i = _rows(p, bi * spB, spN, tok, tok_ok, dd, D)
            for s in tl.static_range(K):
                j, ok = _edge(mask, tok, y, x, tok_ok, s, OFFSETS[s][0], OFFSETS[s][1], H, W, K, OUTGOING)
                diff = _rows(h, bi * shB, shN, j, ok, dd, D) - p_i
                err = _add_column(err, slots, s, tl.sum(diff * diff, axis=1))
        err = tl.sqrt(err)
        we = _weights(w_err, ff, F, BT)

    q_i = _rows(q, bi * sqB, sqN, tok, tok_ok, rr, R)
    a_i = _rows(a, bi * saB, saN, tok, tok_ok, ff, F)
    wl = _weights(w_len, ff, F, BT)
    wo = _weights(w_out, ff, F, BT)
    bo = tl.load(b_out).to(tl.float32)
    score = tl.zeros((BT, KP), dtype=tl.float32)
    real = tl.zeros((BT, KP), dtype=tl.int1)
    for s in tl.static_range(K):
        j, ok = _edge(mask, tok, y, x, tok_ok, s, OFFSETS[s][0], OFFSETS[s][1], H, W, K, OUTGOING)
        z = a_i + _rows(b, bi * sbB, sbN, j, ok, ff, F) + LENGTHS[s] * wl
        if HAS_P:
            z += _column(err, slots, s)[:, None] * we
        s_ij = tl.sum(q_i * _rows(k, bi * skB, skN, j, ok, rr, R), axis=1)
        s_ij += tl.sum(tl.maximum(z, 0.0) * wo, axis=1) + bo
        here = (slots[None, :] == s) & ok[:, None]
        score = tl.where(here, s_ij[:, None], score)  # padding slots keep their 0
        real = real | here

    base = bi * N * K
    _store_edges(s_out, base, tok, tok_ok, score, slots, K)
    _store_edges(err_out, base, tok, tok_ok, tl.where(real, err, 0.0), slots, K)


@triton.jit
def _scores_bwd_kernel(
    ds, err, q, k, a, b, h, p, w_err, w_len, w_out, mask,
    dq, dk, da, db, dh, dp, partial,
    N, H, W, R, F, D, iters,
    sqB, sqN, skB, skN, saB, saN, sbB, sbN, shB, shN, spB, spN,
    OFFSETS: tl.constexpr, LENGTHS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    HAS_P: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr, FP: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    bi = tl.program_id(1).to(tl.int64)
    slots = tl.arange(0, KP)
    rr = tl.arange(0, RP)
    ff = tl.arange(0, FP)
    edges = bi * N * K
    wl = _weights(w_len, ff, F, BT)
    wo = _weights(w_out, ff, F, BT)
    if HAS_P:
        we = _weights(w_err, ff, F, BT)
    # The weight gradients' partial sums, kept per token row and summed over the rows once
    # at the end rather than per edge (a sum across threads).
    acc_out = tl.zeros((BT, FP), dtype=tl.float32)
    acc_len = tl.zeros((BT, FP), dtype=tl.float32)
    acc_err = tl.zeros((BT, FP), dtype=tl.float32)
    acc_bias = tl.zeros((BT,), dtype=tl.float32)
    for it in range(iters):
        tok, y, x, tok_ok = _tile(tl.program_id(0) * iters + it, BT, N, W)
        a_t = _rows(a, bi * saB, saN, tok, tok_ok, ff, F)
        b_t = _rows(b, bi * sbB, sbN, tok, tok_ok, ff, F)
        dq_t = tl.zeros((BT, RP), dtype=tl.float32)
        da_t = tl.zeros((BT, FP), dtype=tl.float32)
        dk_t = tl.zeros((BT, RP), dtype=tl.float32)
        db_t = tl.zeros((BT, FP), dtype=tl.float32)
        # d e / d(h_j - p_i) = (h_j - p_i) / e times d s / d e: its scalar factor per edge,
        # for the tile's own edges (-> dp) and for the edges into its tokens (-> dh).
        coef_out = tl.zeros((BT, KP), dtype=tl.float32)
        coef_in = tl.zeros((BT, KP), dtype=tl.float32)
        for s in tl.static_range(K):
            dy, dx, ln = OFFSETS[s][0], OFFSETS[s][1], LENGTHS[s]
            # i-side: the tile's edge (t, s) from j = t + o -> dq_t, da_t, the weights.
            j, ok = _edge(mask, tok, y, x, tok_ok, s, dy, dx, H, W, K, OUTGOING)
            g = _at_edge(ds, edges, tok, s, K, ok)  # 0 in padding: it passes no gradient
            e = _at_edge(err, edges, tok, s, K, ok)
            dq_t += g[:, None] * _rows(k, bi * skB, skN, j, ok, rr, R)
            z = a_t + _rows(b, bi * sbB, sbN, j, ok, ff, F) + ln * wl
            if HAS_P:
                z += e[:, None] * we
            dz = tl.where(z > 0, g[:, None] * wo, 0.0)
            da_t += dz
            acc_out += g[:, None] * tl.maximum(z, 0.0)
            acc_len += ln * dz
            acc_bias += g
            if HAS_P:
                acc_err += dz * e[:, None]
                # d|x|/dx = x / |x|, 0 at x = 0 (as torch.linalg.vector_norm's gradient)
                coef_out = _add_column(coef_out, slots, s, tl.sum(dz * we, axis=1) / tl.where(e > 0, e, 1.0))

            # j-side: the edge (i, s) from t, i = t - o -> dk_t, db_t.
            i, ok = _edge(mask, tok, y, x, tok_ok, s, -dy, -dx, H, W, K, INCOMING)
            g = _at_edge(ds, edges, i, s, K, ok)
            e = _at_edge(err, edges, i, s, K, ok)
            dk_t += g[:, None] * _rows(q, bi * sqB, sqN, i, ok, rr, R)
            z = _rows(a, bi * saB, saN, i, ok, ff, F) + b_t + ln * wl
            if HAS_P:
                z += e[:, None] * we
            dz = tl.where(z > 0, g[:, None] * wo, 0.0)
            db_t += dz
            if HAS_P:
                coef_in = _add_column(coef_in, slots, s, tl.sum(dz * we, axis=1) / tl.where(e > 0, e, 1.0))
        _store_rows(dq, bi * N * R, tok, tok_ok, dq_t, rr, R)
        _store_rows(dk, bi * N * R, tok, tok_ok, dk_t, rr, R)
        _store_rows(da, bi * N * F, tok, tok_ok, da_t, ff, F)
        _store_rows(db, bi * N * F, tok, tok_ok, db_t, ff, F)

        if HAS_P:  # dp_t = -sum_s c_ts (h_j - p_t), dh_t = sum_s c_is (h_t - p_i), chunk by chunk
            for d0 in range(0, D, BD):
                dd = d0 + tl.arange(0, BD)
                p_t = _rows(p, bi * spB, spN, tok, tok_ok, dd, D)
                h_t = _rows(h, bi * shB, shN, tok, tok_ok, dd, D)
                dp_t = tl.zeros((BT, BD), dtype=tl.float32)
                dh_t = tl.zeros((BT, BD), dtype=tl.float32)
                for s in tl.static_range(K):
                    dy, dx = OFFSETS[s][0], OFFSETS[s][1]
                    j, ok = _edge(mask, tok, y, x, tok_ok, s, dy, dx, H, W, K, OUTGOING)
                    diff = _rows(h, bi * shB, shN, j, ok, dd, D) - p_t
                    dp_t -= _column(coef_out, slots, s)[:, None] * diff
                    i, ok = _edge(mask, tok, y, x, tok_ok, s, -dy, -dx, H, W, K, INCOMING)
                    diff = h_t - _rows(p, bi * spB, spN, i, ok, dd, D)
                    dh_t += _column(coef_in, slots, s)[:, None] * diff
                _store_rows(dp, bi * N * D, tok, tok_ok, dp_t, dd, D)
                _store_rows(dh, bi * N * D, tok, tok_ok, dh_t, dd, D)

    row = partial + (bi * tl.num_programs(0) + tl.program_id(0)) * 4 * FP
    tl.store(row + ff, tl.sum(acc_out, axis=0))
    tl.store(row + FP + ff, tl.sum(acc_len, axis=0))
    tl.store(row + 2 * FP + ff, tl.sum(acc_err, axis=0))
    tl.store(row + 3 * FP, tl.sum(acc_bias, axis=0))


# -- gated aggregation -------------------------------------------------------------------
@triton.jit
def _agg_fwd_kernel(
    scores, keep, m, w_g, b_g, mask, out, gate_mean,
    N, H, W, D, skpB, skpN, skpK, smB, smN,
    OFFSETS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    bi = tl.program_id(1).to(tl.int64)
    tok, y, x, tok_ok = _tile(tl.program_id(0), BT, N, W)
    slots = tl.arange(0, KP)
    edges = bi * N * K
    gate_sum = tl.zeros((BT, KP), dtype=tl.float32)  # over every chunk of D, for the mean
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        wg = _weights(w_g, dd, D, BT)
        bg = _weights(b_g, dd, D, BT)
        agg = tl.zeros((BT, BD), dtype=tl.float32)
        for s in tl.static_range(K):
            j, ok = _edge(mask, tok, y, x, tok_ok, s, OFFSETS[s][0], OFFSETS[s][1], H, W, K, OUTGOING)
            gate, _ = _gates(scores, edges, keep, bi * skpB, skpN, skpK, tok, s, K, ok, wg, bg, dd, D)
            gate_sum = _add_column(gate_sum, slots, s, tl.sum(gate, axis=1))
            agg += gate * _rows(m, bi * smB, smN, j, ok, dd, D)
        _store_rows(out, bi * N * D, tok, tok_ok, agg, dd, D)
    _store_edges(gate_mean, edges, tok, tok_ok, gate_sum / D, slots, K)


@triton.jit
def _agg_bwd_kernel(
    dout, dgm, scores, keep, m, w_g, b_g, mask, ds, dm, partial,
    N, H, W, D, iters, skpB, skpN, skpK, smB, smN,
    OFFSETS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, NC: tl.constexpr,
):  # fmt: skip
    bi = tl.program_id(1).to(tl.int64)
    slots = tl.arange(0, KP)
    chunks = tl.arange(0, NC)
    edges = bi * N * K
    # The weight gradients of the whole width D, as chunks of BD (NC: their count, rounded
    # up to a power of 2): a program's partial sums stay in registers over all its tiles.
    acc_w = tl.zeros((NC, BD), dtype=tl.float32)
    acc_b = tl.zeros((NC, BD), dtype=tl.float32)
    for it in range(iters):
        tok, y, x, tok_ok = _tile(tl.program_id(0) * iters + it, BT, N, W)
        ds_t = tl.zeros((BT, KP), dtype=tl.float32)  # over every chunk of D
        for c in range(tl.cdiv(D, BD)):
            dd = c * BD + tl.arange(0, BD)
            wg = _weights(w_g, dd, D, BT)
            bg = _weights(b_g, dd, D, BT)
            do_t = _rows(dout, bi * N * D, D, tok, tok_ok, dd, D)
            dm_t = tl.zeros((BT, BD), dtype=tl.float32)
            dw = tl.zeros((BT, BD), dtype=tl.float32)  # summed over the rows once per chunk
            dbias = tl.zeros((BT, BD), dtype=tl.float32)
            for s in tl.static_range(K):
                dy, dx = OFFSETS[s][0], OFFSETS[s][1]
                # i-side: d pre-activation of the tile's gate (t, s) from j = t + o:
                # (dout_t m_j + d gate_mean_ts / D) g (1 - g), 0 where the gate is (not kept).
                j, ok = _edge(mask, tok, y, x, tok_ok, s, dy, dx, H, W, K, OUTGOING)
                gate, sv = _gates(scores, edges, keep, bi * skpB, skpN, skpK, tok, s, K, ok, wg, bg, dd, D)
                d_gate = do_t * _rows(m, bi * smB, smN, j, ok, dd, D)
                d_gate += _at_edge(dgm, edges, tok, s, K, ok)[:, None] / D
                d_pre = d_gate * gate * (1.0 - gate)
                ds_t = _add_column(ds_t, slots, s, tl.sum(d_pre * wg, axis=1))
                dw += d_pre * sv[:, None]
                dbias += d_pre
                # j-side: the edge (i, s) from t, i = t - o, brings m_t to i: dm_t += g_is dout_i.
                i, ok = _edge(mask, tok, y, x, tok_ok, s, -dy, -dx, H, W, K, INCOMING)
                gate, _ = _gates(scores, edges, keep, bi * skpB, skpN, skpK, i, s, K, ok, wg, bg, dd, D)
                dm_t += gate * _rows(dout, bi * N * D, D, i, ok, dd, D)
            _store_rows(dm, bi * N * D, tok, tok_ok, dm_t, dd, D)
            this_chunk = chunks[:, None] == c
            acc_w += tl.where(this_chunk, tl.sum(dw, axis=0)[None, :], 0.0)
            acc_b += tl.where(this_chunk, tl.sum(dbias, axis=0)[None, :], 0.0)
        _store_edges(ds, edges, tok, tok_ok, ds_t, slots, K)

    row = partial + (bi * tl.num_programs(0) + tl.program_id(0)) * 2 * NC * BD
    at = chunks[:, None] * BD + tl.arange(0, BD)[None, :]
    tl.store(row + at, acc_w)
    tl.store(row + NC * BD + at, acc_b)


# -- launch helpers ----------------------------------------------------------------------
def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """A (B, N, C) tensor the kernels can address with (batch, token) strides."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _bwd_grid(n_tiles: int, batch: int) -> tuple[int, int]:
    """(programs per image, token tiles per program)."""
    iters = triton.cdiv(n_tiles, max(1, BWD_PROGRAMS // batch))
    return triton.cdiv(n_tiles, iters), iters


def _chunk(d: int, block: int) -> int:
    """The D chunk: ``block`` channels (a power of 2), or fewer if D is narrower."""
    return min(_pow2(block), _pow2(d))


def _promote(*tensors: torch.Tensor | None) -> torch.dtype:
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors if t is not None))


def _scores_dtype(q, k, a, b, h, p, w_err, w_len, w_out, b_out) -> torch.dtype:
    """The reference's output dtype: bilinear term, MLP and bias promote together."""
    return _promote(q, k, a, b, w_len, w_out, b_out, *((h, p, w_err) if p is not None else ()))


def _constants(mask: torch.Tensor, height: int, width: int, offsets: list[int]) -> dict:
    """The stencil's offsets as the kernels take them: constexpr (dy, dx) pairs and their count."""
    pairs = tuple(zip(offsets[0::2], offsets[1::2]))
    if mask.shape != (height * width, len(pairs)):
        raise ValueError(
            f"a {height}x{width} stencil of {len(pairs)} offsets does not match a mask of shape {tuple(mask.shape)}"
        )
    return dict(OFFSETS=pairs, K=len(pairs), KP=_pow2(len(pairs)))


def _mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    return mask.contiguous().view(torch.uint8)


def _strides(name: str, t: torch.Tensor, axes: str = "BN") -> dict:
    """``t``'s strides as the kernels name them: s<name><axis> (sqB, sqN for q's batch and token)."""
    return {f"s{name}{axis}": t.stride(i) for i, axis in enumerate(axes)}


def _row_strides(**rows: torch.Tensor) -> dict:
    """Batch and token strides of every (B, N, C) operand, by the operand's name."""
    return {key: stride for name, t in rows.items() for key, stride in _strides(name, t).items()}


# -- custom ops --------------------------------------------------------------------------
@torch.library.custom_op("afmp::edge_scores", mutates_args=())
def edge_scores_op(
    q: torch.Tensor,
    k: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    h: torch.Tensor,
    p: torch.Tensor | None,
    w_err: torch.Tensor | None,
    w_len: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    mask: torch.Tensor,
    height: int,
    width: int,
    offsets: list[int],
    lengths: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores s, prediction errors e), both (B, N, K), 0 in padding; e is fp32, for the backward.

    The stencil: a ``height`` x ``width`` grid, slot s at offset (offsets[2s], offsets[2s+1])
    of length lengths[s]; ``mask`` (N, K) bool, the scaffold's.
    """
    stencil = _constants(mask, height, width, offsets)
    q, k, a, b, h = map(_rows_view, (q, k, a, b, h))
    has_p = p is not None
    p = _rows_view(p) if has_p else h
    batch, n, r = q.shape
    f, d, kk = a.shape[-1], h.shape[-1], stencil["K"]
    s = q.new_empty(
        (batch, n, kk), dtype=_scores_dtype(q, k, a, b, h, p if has_p else None, w_err, w_len, w_out, b_out)
    )
    err = q.new_empty((batch, n, kk), dtype=torch.float32)
    rows = dict(q=q, k=k, a=a, b=b, h=h, p=p)  # (B, N, C) operands; p is h's stand-in when absent
    weights = dict(w_err=w_err if has_p else w_len, w_len=w_len, w_out=w_out, b_out=b_out.reshape(1))
    _scores_fwd_kernel[(triton.cdiv(n, BLOCK_T), batch)](
        **rows, **weights, mask=_mask_bytes(mask), s_out=s, err_out=err,
        N=n, H=height, W=width, R=r, F=f, D=d, **_row_strides(**rows),
        LENGTHS=tuple(map(float, lengths)), HAS_P=has_p, BT=BLOCK_T, RP=_pow2(r), FP=_pow2(f),
        BD=_chunk(d, BLOCK_D), num_warps=NUM_WARPS, **stencil,
    )  # fmt: skip
    return s, err


@edge_scores_op.register_fake
def _(q, k, a, b, h, p, w_err, w_len, w_out, b_out, mask, height, width, offsets, lengths):
    shape = (q.shape[0], q.shape[1], mask.shape[1])
    dtype = _scores_dtype(q, k, a, b, h, p, w_err, w_len, w_out, b_out)
    return q.new_empty(shape, dtype=dtype), q.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("afmp::edge_scores_backward", mutates_args=())
def edge_scores_backward_op(
    ds: torch.Tensor,
    err: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    h: torch.Tensor,
    p: torch.Tensor | None,
    w_err: torch.Tensor | None,
    w_len: torch.Tensor,
    w_out: torch.Tensor,
    mask: torch.Tensor,
    height: int,
    width: int,
    offsets: list[int],
    lengths: list[float],
) -> list[torch.Tensor]:
    """[dq, dk, da, db, dh, dp, dw_err, dw_len, dw_out, db_out]; dh, dp, dw_err empty without p."""
    stencil = _constants(mask, height, width, offsets)
    q, k, a, b, h = map(_rows_view, (q, k, a, b, h))
    has_p = p is not None
    p = _rows_view(p) if has_p else h
    batch, n, r = q.shape
    f, d = a.shape[-1], h.shape[-1]
    programs, iters = _bwd_grid(triton.cdiv(n, BWD_BLOCK_T), batch)
    fp = _pow2(f)
    # Gradients are stored in their input's dtype straight from the fp32 accumulators.
    dq, dk, da, db = (x.new_empty(x.shape) for x in (q, k, a, b))
    dh, dp = (x.new_empty(x.shape if has_p else (0,)) for x in (h, p))
    partial = torch.empty((batch * programs, 4, fp), dtype=torch.float32, device=q.device)
    rows = dict(q=q, k=k, a=a, b=b, h=h, p=p)  # (B, N, C) operands; p is h's stand-in when absent
    weights = dict(w_err=w_err if has_p else w_len, w_len=w_len, w_out=w_out)
    grads = dict(dq=dq, dk=dk, da=da, db=db, dh=dh if has_p else dq, dp=dp if has_p else dq)
    _scores_bwd_kernel[(programs, batch)](
        ds=ds.contiguous(), err=err.contiguous(), **rows, **weights, mask=_mask_bytes(mask),
        **grads, partial=partial,
        N=n, H=height, W=width, R=r, F=f, D=d, iters=iters, **_row_strides(**rows),
        LENGTHS=tuple(map(float, lengths)), HAS_P=has_p, BT=BWD_BLOCK_T, RP=_pow2(r), FP=fp,
        BD=_chunk(d, BWD_BLOCK_D), num_warps=BWD_NUM_WARPS, **stencil,
    )  # fmt: skip
    weights = partial.sum(0)  # the outputs below are copies: an op's outputs may not alias
    dw_err = weights[2, :f].to(w_err.dtype, copy=True) if has_p else w_len.new_empty(0)
    return [
        dq,
        dk,
        da,
        db,
        dh,
        dp,
        dw_err,
        weights[1, :f].to(w_len.dtype, copy=True),
        weights[0, :f].to(w_out.dtype, copy=True),
        weights[3, 0].to(w_out.dtype, copy=True),
    ]


@edge_scores_backward_op.register_fake
def _(ds, err, q, k, a, b, h, p, w_err, w_len, w_out, mask, height, width, offsets, lengths):
    empty = w_len.new_empty(0)
    has_p = p is not None
    return [
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        a.new_empty(a.shape),
        b.new_empty(b.shape),
        h.new_empty(h.shape) if has_p else h.new_empty(0),
        p.new_empty(p.shape) if has_p else h.new_empty(0),
        w_err.new_empty(w_err.shape) if has_p else empty,
        w_len.new_empty(w_len.shape),
        w_out.new_empty(w_out.shape),
        w_out.new_empty(()),
    ]


@torch.library.custom_op("afmp::gated_aggregate", mutates_args=())
def gated_aggregate_op(
    s: torch.Tensor,
    keep: torch.Tensor,
    m: torch.Tensor,
    w_g: torch.Tensor,
    b_g: torch.Tensor,
    mask: torch.Tensor,
    height: int,
    width: int,
    offsets: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_s g_s m_(t + o_s) (B, N, D), mean_D g (B, N, K)), g = keep sigmoid(w_g s + b_g)."""
    stencil = _constants(mask, height, width, offsets)
    s, m = s.contiguous(), _rows_view(m)
    batch, n, kk = s.shape
    d = m.shape[-1]
    out = m.new_empty((batch, n, d), dtype=_promote(s, w_g, b_g, m))
    gate_mean = s.new_empty((batch, n, kk), dtype=_promote(s, w_g, b_g))
    keep = keep.expand(batch, n, kk).view(torch.uint8)
    _agg_fwd_kernel[(triton.cdiv(n, BLOCK_T), batch)](
        scores=s, keep=keep, m=m, w_g=w_g, b_g=b_g, mask=_mask_bytes(mask), out=out, gate_mean=gate_mean,
        N=n, H=height, W=width, D=d, **_strides("kp", keep, "BNK"), **_strides("m", m),
        BT=BLOCK_T, BD=_chunk(d, BLOCK_D), num_warps=NUM_WARPS, **stencil,
    )  # fmt: skip
    return out, gate_mean


@gated_aggregate_op.register_fake
def _(s, keep, m, w_g, b_g, mask, height, width, offsets):
    out = m.new_empty((*s.shape[:2], m.shape[-1]), dtype=_promote(s, w_g, b_g, m))
    return out, s.new_empty(s.shape, dtype=_promote(s, w_g, b_g))


@torch.library.custom_op("afmp::gated_aggregate_backward", mutates_args=())
def gated_aggregate_backward_op(
    dout: torch.Tensor,
    dgm: torch.Tensor,
    s: torch.Tensor,
    keep: torch.Tensor,
    m: torch.Tensor,
    w_g: torch.Tensor,
    b_g: torch.Tensor,
    mask: torch.Tensor,
    height: int,
    width: int,
    offsets: list[int],
) -> list[torch.Tensor]:
    """[ds, dm, dw_g, db_g]."""
    stencil = _constants(mask, height, width, offsets)
    s, m = s.contiguous(), _rows_view(m)
    batch, n, kk = s.shape
    d = m.shape[-1]
    bd = _chunk(d, BWD_BLOCK_D)
    nc = _pow2(triton.cdiv(d, bd))
    programs, iters = _bwd_grid(triton.cdiv(n, BWD_BLOCK_T), batch)
    keep = keep.expand(batch, n, kk).view(torch.uint8)
    ds, dm = s.new_empty(s.shape), m.new_empty(m.shape)
    partial = torch.empty((batch * programs, 2, nc * bd), dtype=torch.float32, device=s.device)
    _agg_bwd_kernel[(programs, batch)](
        dout=dout.contiguous(), dgm=dgm.contiguous(), scores=s, keep=keep, m=m, w_g=w_g, b_g=b_g,
        mask=_mask_bytes(mask), ds=ds, dm=dm, partial=partial,
        N=n, H=height, W=width, D=d, iters=iters, **_strides("kp", keep, "BNK"), **_strides("m", m),
        BT=BWD_BLOCK_T, BD=bd, NC=nc, num_warps=BWD_NUM_WARPS, **stencil,
    )  # fmt: skip
    weights = partial.sum(0)
    return [
        ds,
        dm,
        weights[0, :d].to(w_g.dtype, copy=True),
        weights[1, :d].to(b_g.dtype, copy=True),
    ]


@gated_aggregate_backward_op.register_fake
def _(dout, dgm, s, keep, m, w_g, b_g, mask, height, width, offsets):
    return [s.new_empty(s.shape), m.new_empty(m.shape), w_g.new_empty(w_g.shape), b_g.new_empty(b_g.shape)]


# -- autograd ----------------------------------------------------------------------------
def _scores_setup(ctx, inputs, output):
    ctx.has_p = inputs[5] is not None
    ctx.stencil = inputs[11:]  # height, width, offsets, lengths: plain Python
    ctx.save_for_backward(*inputs[:11], output[1])


def _scores_backward(ctx, ds, _derr):
    q, k, a, b, h, p, w_err, w_len, w_out, b_out, mask, err = ctx.saved_tensors
    dq, dk, da, db, dh, dp, dw_err, dw_len, dw_out, db_out = torch.ops.afmp.edge_scores_backward(
        ds, err, q, k, a, b, h, p, w_err, w_len, w_out, mask, *ctx.stencil
    )
    if not ctx.has_p:  # h only enters through the prediction error
        dh = dp = dw_err = None
    db_out = db_out.reshape(b_out.shape).to(b_out.dtype)
    return dq, dk, da, db, dh, dp, dw_err, dw_len, dw_out, db_out, None, None, None, None, None


def _agg_setup(ctx, inputs, output):
    ctx.stencil = inputs[6:]  # height, width, offsets
    ctx.save_for_backward(*inputs[:6])


def _agg_backward(ctx, dout, dgm):
    s, keep, m, w_g, b_g, mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros(m.shape, dtype=_promote(s, w_g, b_g, m), device=m.device)
    if dgm is None:
        dgm = torch.zeros(s.shape, dtype=_promote(s, w_g, b_g), device=s.device)
    ds, dm, dw_g, db_g = torch.ops.afmp.gated_aggregate_backward(
        dout, dgm, s, keep, m, w_g, b_g, mask, *ctx.stencil
    )
    return ds, None, dm, dw_g, db_g, None, None, None, None


edge_scores_op.register_autograd(_scores_backward, setup_context=_scores_setup)
gated_aggregate_op.register_autograd(_agg_backward, setup_context=_agg_setup)


# -- the backend -------------------------------------------------------------------------
class StencilArgs(NamedTuple):
    """A stencil scaffold as the custom ops take it (flat: an op's arguments must be tensors,
    numbers or lists): the (N, K) mask, the grid, slot s's offset at offsets[2s], offsets[2s+1]."""

    mask: torch.Tensor
    height: int
    width: int
    offsets: list[int]
    lengths: list[float]


def stencil_args(sc: Scaffold) -> StencilArgs:
    reason = stencil_edge.scaffold_why_not(sc)
    if reason is not None:
        raise ValueError(f"the triton backend cannot run on this scaffold: {reason}")
    st = sc.stencil
    offsets = [c for offset in st.offsets for c in offset]
    return StencilArgs(sc.mask, st.height, st.width, offsets, list(st.lengths))


def edge_scores(q, k, a, b, h, p, w_err, w_len, w_out, b_out, sc: Scaffold) -> torch.Tensor:
    """``afmp.ops.edge.edge_scores`` by the Triton kernels; padding slots score exactly 0."""
    grid = stencil_args(sc)
    return edge_scores_op(q, k, a, b, h, p, w_err, w_len, w_out, b_out, *grid)[0]


def gated_aggregate(s, keep, m, w_g, b_g, sc: Scaffold) -> tuple[torch.Tensor, torch.Tensor]:
    """``afmp.ops.edge.gated_aggregate`` by the Triton kernels."""
    grid = stencil_args(sc)
    return gated_aggregate_op(s, keep, m, w_g, b_g, grid.mask, grid.height, grid.width, grid.offsets)


def why_not(device: torch.device) -> str | None:
    return triton_why_not(device, interpreted=INTERPRETED)
