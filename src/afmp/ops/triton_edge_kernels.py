"""Triton kernels for AFMP's per-edge stage on a token grid, forward and backward.

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

The launch wrappers, custom ops and autograd are in ``afmp.ops.triton_edge``.
"""

import triton
import triton.language as tl

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
def scores_fwd_kernel(
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
def scores_bwd_kernel(
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
def agg_fwd_kernel(
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
def agg_bwd_kernel(
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
