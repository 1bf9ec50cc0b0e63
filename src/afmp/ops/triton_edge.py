"""Triton kernels for AFMP's per-edge stage, forward and backward (backend ``triton``).

Same functions as ``afmp.ops.edge`` (the reference), without (B, N, K, D) tensors:
a program takes a block of BT tokens of one image and works on [BT, K, C] tiles
gathered from the per-token tensors (C = R, F or D, whole in one tile), so each
gathered row is read from memory (mostly L2: neighbours are close in the grid) and
nothing per edge wider than a scalar is written. The forward writes the scores s and
the prediction errors e (B, N, K); the backward recomputes the gates and the MLP's
hidden layer from them.

Backward is pull-style: the gradients that land on token j (dk, db, dh, dm) are
gathered over the edges that point at j, found through the scaffold's ``reverse``
(the slot of j in i's list). A padding slot (i, t) points at i itself and its
reverse is itself, so padding contributes exactly as in the reference. Weight
gradients are per-program partial sums (each program loops over several token
blocks), summed afterwards. Everything accumulates in fp32.

The kernels are wrapped as ``torch.library`` custom ops (``afmp::edge_scores``,
``afmp::gated_aggregate`` and their backwards) with fake implementations, so
torch.compile traces a model through them without graph breaks.
"""

import functools
import os

import torch
import triton
import triton.language as tl

# The interpreter is chosen when a kernel is defined, so read the flag at import time.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Launch knobs, read at each call: tile budgets BT * K * C per program for the forward
# and backward kernels, backward programs per launch (each loops over the token blocks
# left; its weight partials are one row), warps. Defaults: the fastest of a sweep on an
# H100 at AFMP-Small's shape (batch 64, D=512, bf16, 56x56; scripts/gpu_edge_check.py),
# where 4 warps beat 8 by 1.6x forward and 2.4x backward.
TILE_ELEMENTS = 8192
BWD_TILE_ELEMENTS = 4096
BWD_PROGRAMS = 16384
NUM_WARPS = 4
BWD_NUM_WARPS = 4


# -- kernels ---------------------------------------------------------------------------
@triton.jit
def _gather(ptr, batch_off, s_tok, tok, mask, offs, n_ch):
    """Rows ``tok`` (any 2-D int tile) of one image as a float32 tile [.., .., C]."""
    ptrs = ptr + batch_off + tok[:, :, None].to(tl.int64) * s_tok + offs[None, None, :]
    m = mask[:, :, None] & (offs < n_ch)[None, None, :]
    return tl.load(ptrs, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _cast(x, ptr):
    """``x`` in the dtype ``ptr`` points at (stores round once, from the fp32 accumulator)."""
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _reverse_edges(nbr, rev, tok, slot, valid, K):
    """For slots (j, t): the edge (i, slot') that points at j, as i and i * K + slot'."""
    src = tl.load(nbr + tok[:, None] * K + slot[None, :], mask=valid, other=0)
    rslot = tl.load(rev + tok[:, None] * K + slot[None, :], mask=valid, other=0)
    is_pad = src == tok[:, None]  # no real edge is a self-loop
    src_slot = tl.where(is_pad, slot[None, :], rslot)
    return src, src * K + src_slot


@triton.jit
def _scores_fwd_kernel(
    q, k, a, b, h, p, w_err, w_len, w_out, b_out, nbr, length, s_out, err_out,
    N, K, R, F, D,
    sqB, sqN, skB, skN, saB, saN, sbB, sbN, shB, shN, spB, spN,
    HAS_P: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr,
    RP: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    bi = tl.program_id(1).to(tl.int64)
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    slot = tl.arange(0, KP)
    tok_ok = (tok < N)[:, None]
    valid = tok_ok & (slot < K)[None, :]
    edge = tok[:, None] * K + slot[None, :]
    j = tl.load(nbr + edge, mask=valid, other=0)
    ln = tl.load(length + edge, mask=valid, other=0.0).to(tl.float32)
    rr = tl.arange(0, RP)
    ff = tl.arange(0, FP)

    q_i = _gather(q, bi * sqB, sqN, tok[:, None], tok_ok, rr, R)
    k_j = _gather(k, bi * skB, skN, j, valid, rr, R)
    score = tl.sum(q_i * k_j, axis=2)

    z = _gather(a, bi * saB, saN, tok[:, None], tok_ok, ff, F) + _gather(b, bi * sbB, sbN, j, valid, ff, F)
    z += ln[:, :, None] * tl.load(w_len + ff, mask=ff < F, other=0.0).to(tl.float32)[None, None, :]
    if HAS_P:
        dd = tl.arange(0, DP)
        diff = _gather(h, bi * shB, shN, j, valid, dd, D) - _gather(
            p, bi * spB, spN, tok[:, None], tok_ok, dd, D
        )
        err = tl.sqrt(tl.sum(diff * diff, axis=2))
        z += err[:, :, None] * tl.load(w_err + ff, mask=ff < F, other=0.0).to(tl.float32)[None, None, :]
    else:
        err = tl.zeros((BT, KP), dtype=tl.float32)
    wo = tl.load(w_out + ff, mask=ff < F, other=0.0).to(tl.float32)
    score += tl.sum(tl.maximum(z, 0.0) * wo[None, None, :], axis=2) + tl.load(b_out).to(tl.float32)

    out = bi * N * K + edge
    tl.store(s_out + out, score.to(s_out.dtype.element_ty), mask=valid)
    tl.store(err_out + out, err, mask=valid)


@triton.jit
def _scores_bwd_kernel(
    ds, err, q, k, a, b, h, p, w_err, w_len, w_out, nbr, length, rev,
    dq, dk, da, db, dh, dp, partial,
    N, K, R, F, D, iters,
    sqB, sqN, skB, skN, saB, saN, sbB, sbN, shB, shN, spB, spN,
    HAS_P: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr,
    RP: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    bi = tl.program_id(1).to(tl.int64)
    slot = tl.arange(0, KP)
    rr = tl.arange(0, RP)
    ff = tl.arange(0, FP)
    dd = tl.arange(0, DP)
    edge_base = bi * N * K
    wl = tl.load(w_len + ff, mask=ff < F, other=0.0).to(tl.float32)[None, None, :]
    wo = tl.load(w_out + ff, mask=ff < F, other=0.0).to(tl.float32)[None, None, :]
    if HAS_P:
        we = tl.load(w_err + ff, mask=ff < F, other=0.0).to(tl.float32)[None, None, :]
    else:
        we = tl.zeros((1, 1, FP), dtype=tl.float32)
    acc_out = tl.zeros((FP,), dtype=tl.float32)
    acc_len = tl.zeros((FP,), dtype=tl.float32)
    acc_err = tl.zeros((FP,), dtype=tl.float32)
    acc_bias = tl.zeros((KP,), dtype=tl.float32)
    for it in range(iters):
        tok = (tl.program_id(0) * iters + it) * BT + tl.arange(0, BT)
        tok_ok = (tok < N)[:, None]
        valid = tok_ok & (slot < K)[None, :]
        row = tok[:, None].to(tl.int64)
        c_r = (rr < R)[None, :] & tok_ok
        c_f = (ff < F)[None, :] & tok_ok

        # i-side: the edges (i, slot) of this block's tokens -> dq_i, da_i, dp_i, weights.
        edge = tok[:, None] * K + slot[None, :]
        j = tl.load(nbr + edge, mask=valid, other=0)
        g = tl.load(ds + edge_base + edge, mask=valid, other=0.0).to(tl.float32)
        er = tl.load(err + edge_base + edge, mask=valid, other=0.0)
        ln = tl.load(length + edge, mask=valid, other=0.0).to(tl.float32)
        k_j = _gather(k, bi * skB, skN, j, valid, rr, R)
        tl.store(
            dq + bi * N * R + row * R + rr[None, :], _cast(tl.sum(g[:, :, None] * k_j, axis=1), dq), mask=c_r
        )
        z = _gather(a, bi * saB, saN, tok[:, None], tok_ok, ff, F) + _gather(
            b, bi * sbB, sbN, j, valid, ff, F
        )
        z += ln[:, :, None] * wl + er[:, :, None] * we
        dz = tl.where(z > 0, g[:, :, None] * wo, 0.0)
        tl.store(da + bi * N * F + row * F + ff[None, :], _cast(tl.sum(dz, axis=1), da), mask=c_f)
        acc_out += tl.sum(tl.sum(g[:, :, None] * tl.maximum(z, 0.0), axis=0), axis=0)
        acc_len += tl.sum(tl.sum(dz * ln[:, :, None], axis=0), axis=0)
        acc_err += tl.sum(tl.sum(dz * er[:, :, None], axis=0), axis=0)
        acc_bias += tl.sum(g, axis=0)
        if HAS_P:
            coef = tl.sum(dz * we, axis=2) / tl.where(er > 0, er, 1.0)  # d|x|/dx = x/|x|, 0 at 0
            diff = _gather(h, bi * shB, shN, j, valid, dd, D) - _gather(
                p, bi * spB, spN, tok[:, None], tok_ok, dd, D
            )
            dp_i = -tl.sum(coef[:, :, None] * diff, axis=1)
            tl.store(
                dp + bi * N * D + row * D + dd[None, :], _cast(dp_i, dp), mask=(dd < D)[None, :] & tok_ok
            )

        # j-side: the edges (i, slot') that point at this block's tokens -> dk_j, db_j, dh_j.
        src, src_edge = _reverse_edges(nbr, rev, tok, slot, valid, K)
        g = tl.load(ds + edge_base + src_edge, mask=valid, other=0.0).to(tl.float32)
        er = tl.load(err + edge_base + src_edge, mask=valid, other=0.0)
        ln = tl.load(length + src_edge, mask=valid, other=0.0).to(tl.float32)
        q_src = _gather(q, bi * sqB, sqN, src, valid, rr, R)
        tl.store(
            dk + bi * N * R + row * R + rr[None, :],
            _cast(tl.sum(g[:, :, None] * q_src, axis=1), dk),
            mask=c_r,
        )
        z = _gather(a, bi * saB, saN, src, valid, ff, F) + _gather(
            b, bi * sbB, sbN, tok[:, None], tok_ok, ff, F
        )
        z += ln[:, :, None] * wl + er[:, :, None] * we
        dz = tl.where(z > 0, g[:, :, None] * wo, 0.0)
        tl.store(db + bi * N * F + row * F + ff[None, :], _cast(tl.sum(dz, axis=1), db), mask=c_f)
        if HAS_P:
            coef = tl.sum(dz * we, axis=2) / tl.where(er > 0, er, 1.0)
            diff = _gather(h, bi * shB, shN, tok[:, None], tok_ok, dd, D) - _gather(
                p, bi * spB, spN, src, valid, dd, D
            )
            dh_j = tl.sum(coef[:, :, None] * diff, axis=1)
            tl.store(
                dh + bi * N * D + row * D + dd[None, :], _cast(dh_j, dh), mask=(dd < D)[None, :] & tok_ok
            )

    out = partial + (bi * tl.num_programs(0) + tl.program_id(0)) * 4 * FP
    tl.store(out + ff, acc_out)
    tl.store(out + FP + ff, acc_len)
    tl.store(out + 2 * FP + ff, acc_err)
    tl.store(out + 3 * FP, tl.sum(acc_bias, axis=0))


@triton.jit
def _gates(s, w_g, b_g, keep, dd, D):
    """keep * sigmoid(w_g s + b_g), [BT, K, D] from scores [BT, K] (0 on padded channels)."""
    wg = tl.load(w_g + dd, mask=dd < D, other=0.0).to(tl.float32)
    bg = tl.load(b_g + dd, mask=dd < D, other=0.0).to(tl.float32)
    gate = tl.sigmoid(s[:, :, None] * wg[None, None, :] + bg[None, None, :])
    return gate * keep[:, :, None] * (dd < D)[None, None, :].to(tl.float32)


@triton.jit
def _agg_fwd_kernel(
    s, keep, m, w_g, b_g, nbr, out, gate_mean,
    N, K, D, skpB, skpN, skpK, smB, smN,
    BT: tl.constexpr, KP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    bi = tl.program_id(1).to(tl.int64)
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    slot = tl.arange(0, KP)
    dd = tl.arange(0, DP)
    tok_ok = (tok < N)[:, None]
    valid = tok_ok & (slot < K)[None, :]
    edge = tok[:, None] * K + slot[None, :]
    j = tl.load(nbr + edge, mask=valid, other=0)
    sv = tl.load(s + bi * N * K + edge, mask=valid, other=0.0).to(tl.float32)
    kp = tl.load(keep + bi * skpB + tok[:, None] * skpN + slot[None, :] * skpK, mask=valid, other=0)
    gate = _gates(sv, w_g, b_g, kp.to(tl.float32), dd, D)
    agg = tl.sum(gate * _gather(m, bi * smB, smN, j, valid, dd, D), axis=1)
    row = tok[:, None].to(tl.int64)
    tl.store(
        out + bi * N * D + row * D + dd[None, :],
        agg.to(out.dtype.element_ty),
        mask=tok_ok & (dd < D)[None, :],
    )
    mean = tl.sum(gate, axis=2) / D
    tl.store(gate_mean + bi * N * K + edge, mean.to(gate_mean.dtype.element_ty), mask=valid)


@triton.jit
def _agg_bwd_kernel(
    dout, dgm, s, keep, m, w_g, b_g, nbr, rev, ds, dm, partial,
    N, K, D, iters, skpB, skpN, skpK, smB, smN,
    BT: tl.constexpr, KP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    bi = tl.program_id(1).to(tl.int64)
    slot = tl.arange(0, KP)
    dd = tl.arange(0, DP)
    wg = tl.load(w_g + dd, mask=dd < D, other=0.0).to(tl.float32)[None, None, :]
    acc_w = tl.zeros((DP,), dtype=tl.float32)
    acc_b = tl.zeros((DP,), dtype=tl.float32)
    for it in range(iters):
        tok = (tl.program_id(0) * iters + it) * BT + tl.arange(0, BT)
        tok_ok = (tok < N)[:, None]
        valid = tok_ok & (slot < K)[None, :]
        row = tok[:, None].to(tl.int64)
        c_d = tok_ok & (dd < D)[None, :]

        # i-side: ds_ik = sum_d (dout_i m_j + dgm_ik / D) g (1 - g) w_g, and the weights.
        edge = tok[:, None] * K + slot[None, :]
        j = tl.load(nbr + edge, mask=valid, other=0)
        sv = tl.load(s + bi * N * K + edge, mask=valid, other=0.0).to(tl.float32)
        kp = tl.load(keep + bi * skpB + tok[:, None] * skpN + slot[None, :] * skpK, mask=valid, other=0)
        gate = _gates(sv, w_g, b_g, kp.to(tl.float32), dd, D)
        do_i = tl.load(
            dout + bi * N * D + row[:, :, None] * D + dd[None, None, :], mask=c_d[:, None, :], other=0.0
        )
        gm = tl.load(dgm + bi * N * K + edge, mask=valid, other=0.0).to(tl.float32)
        m_j = _gather(m, bi * smB, smN, j, valid, dd, D)
        # gate is 0 where not kept, so g (1 - g) needs no extra keep factor.
        x = gate * (1.0 - gate) * (do_i.to(tl.float32) * m_j + gm[:, :, None] / D)
        tl.store(ds + bi * N * K + edge, _cast(tl.sum(x * wg, axis=2), ds), mask=valid)
        acc_w += tl.sum(tl.sum(x * sv[:, :, None], axis=0), axis=0)
        acc_b += tl.sum(tl.sum(x, axis=0), axis=0)

        # j-side: dm_j = sum over edges (i, slot') into j of g_i,slot' * dout_i.
        src, src_edge = _reverse_edges(nbr, rev, tok, slot, valid, K)
        src_slot = src_edge - src * K
        sv = tl.load(s + bi * N * K + src_edge, mask=valid, other=0.0).to(tl.float32)
        kp = tl.load(keep + bi * skpB + src * skpN + src_slot * skpK, mask=valid, other=0)
        gate = _gates(sv, w_g, b_g, kp.to(tl.float32), dd, D)
        do_src = _gather(dout, bi * N * D, D, src, valid, dd, D)
        tl.store(dm + bi * N * D + row * D + dd[None, :], _cast(tl.sum(gate * do_src, axis=1), dm), mask=c_d)

    out = partial + (bi * tl.num_programs(0) + tl.program_id(0)) * 2 * DP
    tl.store(out + dd, acc_w)
    tl.store(out + DP + dd, acc_b)


# -- launch helpers --------------------------------------------------------------------
def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def _block(k: int, widest: int, budget: int) -> tuple[int, int]:
    """(tokens per block, padded K): BT * KP * widest channel tile stays within budget."""
    kp = _pow2(k)
    return max(1, min(16, budget // (kp * _pow2(widest)))), kp


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (B, N, C) tensor the kernels can address with (batch, token) strides."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _bwd_grid(n_blocks: int, batch: int) -> tuple[int, int]:
    """(programs per image, token blocks per program)."""
    iters = triton.cdiv(n_blocks, max(1, BWD_PROGRAMS // batch))
    return triton.cdiv(n_blocks, iters), iters


def _promote(*tensors: torch.Tensor | None) -> torch.dtype:
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors if t is not None))


def _scores_dtype(q, k, a, b, h, p, w_err, w_len, w_out, b_out) -> torch.dtype:
    """The reference's output dtype: bilinear term, MLP and bias promote together."""
    return _promote(q, k, a, b, w_len, w_out, b_out, *((h, p, w_err) if p is not None else ()))


# -- custom ops ------------------------------------------------------------------------
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
    nbr: torch.Tensor,
    length: torch.Tensor,
    reverse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores s, prediction errors e), both (B, N, K); e is fp32 and kept for the backward.

    ``reverse`` is unused here; it is an input so the backward finds it saved.
    """
    q, k, a, b, h = map(_rows, (q, k, a, b, h))
    has_p = p is not None
    p = _rows(p) if has_p else h
    batch, n, r = q.shape
    f, d, kk = a.shape[-1], h.shape[-1], nbr.shape[1]
    s = q.new_empty(
        (batch, n, kk), dtype=_scores_dtype(q, k, a, b, h, p if has_p else None, w_err, w_len, w_out, b_out)
    )
    err = q.new_empty((batch, n, kk), dtype=torch.float32)
    bt, kp = _block(kk, max(r, f, d if has_p else 1), TILE_ELEMENTS)
    _scores_fwd_kernel[(triton.cdiv(n, bt), batch)](
        q, k, a, b, h, p, w_err if has_p else w_len, w_len, w_out, b_out.reshape(1), nbr.contiguous(),
        length.contiguous(), s, err, n, kk, r, f, d,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), h.stride(0), h.stride(1), p.stride(0), p.stride(1),
        HAS_P=has_p, BT=bt, KP=kp, RP=_pow2(r), FP=_pow2(f), DP=_pow2(d) if has_p else 2,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return s, err


@edge_scores_op.register_fake
def _(q, k, a, b, h, p, w_err, w_len, w_out, b_out, nbr, length, reverse):
    shape = (q.shape[0], q.shape[1], nbr.shape[1])
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
    nbr: torch.Tensor,
    length: torch.Tensor,
    reverse: torch.Tensor,
) -> list[torch.Tensor]:
    """[dq, dk, da, db, dh, dp, dw_err, dw_len, dw_out, db_out]; dh, dp, dw_err empty without p."""
    q, k, a, b, h = map(_rows, (q, k, a, b, h))
    has_p = p is not None
    p = _rows(p) if has_p else h
    batch, n, r = q.shape
    f, d, kk = a.shape[-1], h.shape[-1], nbr.shape[1]
    widest = max(r, f, d if has_p else 1)
    bt, kp = _block(kk, widest, BWD_TILE_ELEMENTS)
    programs, iters = _bwd_grid(triton.cdiv(n, bt), batch)
    fp = _pow2(f)
    # Gradients are stored in their input's dtype straight from the fp32 accumulators.
    dq, dk, da, db = (x.new_empty(x.shape) for x in (q, k, a, b))
    dh, dp = (x.new_empty(x.shape if has_p else (0,)) for x in (h, p))
    partial = torch.empty((batch * programs, 4, fp), dtype=torch.float32, device=q.device)
    _scores_bwd_kernel[(programs, batch)](
        ds.contiguous(), err.contiguous(), q, k, a, b, h, p, w_err if has_p else w_len, w_len, w_out,
        nbr.contiguous(), length.contiguous(), reverse.contiguous(),
        dq, dk, da, db, dh if has_p else dq, dp if has_p else dq, partial,
        n, kk, r, f, d, iters,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), h.stride(0), h.stride(1), p.stride(0), p.stride(1),
        HAS_P=has_p, BT=bt, KP=kp, RP=_pow2(r), FP=fp, DP=_pow2(d) if has_p else 2,
        num_warps=BWD_NUM_WARPS,
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
def _(ds, err, q, k, a, b, h, p, w_err, w_len, w_out, nbr, length, reverse):
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
    nbr: torch.Tensor,
    reverse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_k keep g m_nbr (B, N, D), mean_D keep g (B, N, K)); ``reverse`` as for edge_scores."""
    s, m = s.contiguous(), _rows(m)
    batch, n, kk = s.shape
    d = m.shape[-1]
    out = m.new_empty((batch, n, d), dtype=_promote(s, w_g, b_g, m))
    gate_mean = s.new_empty((batch, n, kk), dtype=_promote(s, w_g, b_g))
    keep = keep.expand(batch, n, kk).view(torch.uint8)
    bt, kp = _block(kk, d, TILE_ELEMENTS)
    _agg_fwd_kernel[(triton.cdiv(n, bt), batch)](
        s, keep, m, w_g, b_g, nbr.contiguous(), out, gate_mean, n, kk, d,
        keep.stride(0), keep.stride(1), keep.stride(2), m.stride(0), m.stride(1),
        BT=bt, KP=kp, DP=_pow2(d), num_warps=NUM_WARPS,
    )  # fmt: skip
    return out, gate_mean


@gated_aggregate_op.register_fake
def _(s, keep, m, w_g, b_g, nbr, reverse):
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
    nbr: torch.Tensor,
    reverse: torch.Tensor,
) -> list[torch.Tensor]:
    """[ds, dm, dw_g, db_g]."""
    s, m = s.contiguous(), _rows(m)
    batch, n, kk = s.shape
    d = m.shape[-1]
    bt, kp = _block(kk, d, BWD_TILE_ELEMENTS)
    programs, iters = _bwd_grid(triton.cdiv(n, bt), batch)
    keep = keep.expand(batch, n, kk).view(torch.uint8)
    ds, dm = s.new_empty(s.shape), m.new_empty(m.shape)
    partial = torch.empty((batch * programs, 2, _pow2(d)), dtype=torch.float32, device=s.device)
    _agg_bwd_kernel[(programs, batch)](
        dout.contiguous(), dgm.contiguous(), s, keep, m, w_g, b_g, nbr.contiguous(), reverse.contiguous(),
        ds, dm, partial, n, kk, d, iters,
        keep.stride(0), keep.stride(1), keep.stride(2), m.stride(0), m.stride(1),
        BT=bt, KP=kp, DP=_pow2(d), num_warps=BWD_NUM_WARPS,
    )  # fmt: skip
    weights = partial.sum(0)
    return [
        ds,
        dm,
        weights[0, :d].to(w_g.dtype, copy=True),
        weights[1, :d].to(b_g.dtype, copy=True),
    ]


@gated_aggregate_backward_op.register_fake
def _(dout, dgm, s, keep, m, w_g, b_g, nbr, reverse):
    return [s.new_empty(s.shape), m.new_empty(m.shape), w_g.new_empty(w_g.shape), b_g.new_empty(b_g.shape)]


# -- autograd --------------------------------------------------------------------------
def _scores_setup(ctx, inputs, output):
    ctx.has_p = inputs[5] is not None
    ctx.save_for_backward(*inputs, output[1])


def _scores_backward(ctx, ds, _derr):
    q, k, a, b, h, p, w_err, w_len, w_out, b_out, nbr, length, reverse, err = ctx.saved_tensors
    dq, dk, da, db, dh, dp, dw_err, dw_len, dw_out, db_out = torch.ops.afmp.edge_scores_backward(
        ds, err, q, k, a, b, h, p, w_err, w_len, w_out, nbr, length, reverse
    )
    if not ctx.has_p:  # h only enters through the prediction error
        dh = dp = dw_err = None
    return (
        dq,
        dk,
        da,
        db,
        dh,
        dp,
        dw_err,
        dw_len,
        dw_out,
        db_out.reshape(b_out.shape).to(b_out.dtype),
        None,
        None,
        None,
    )


def _agg_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _agg_backward(ctx, dout, dgm):
    s, keep, m, w_g, b_g, nbr, reverse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros(m.shape, dtype=_promote(s, w_g, b_g, m), device=m.device)
    if dgm is None:
        dgm = torch.zeros(s.shape, dtype=_promote(s, w_g, b_g), device=s.device)
    ds, dm, dw_g, db_g = torch.ops.afmp.gated_aggregate_backward(
        dout, dgm, s, keep, m, w_g, b_g, nbr, reverse
    )
    return ds, None, dm, dw_g, db_g, None, None


edge_scores_op.register_autograd(_scores_backward, setup_context=_scores_setup)
gated_aggregate_op.register_autograd(_agg_backward, setup_context=_agg_setup)


# -- the backend -----------------------------------------------------------------------
def reverse_slots(nbr: torch.Tensor) -> torch.Tensor:
    """``Scaffold.reverse`` recomputed from a symmetric neighbour list (N, K); 0 in padding.

    For callers that did not keep the scaffold's own; costs an (N, K, K) comparison.
    """
    n = nbr.shape[0]
    rows = torch.arange(n, device=nbr.device)
    hits = nbr[nbr] == rows[:, None, None]  # [i, slot, t]: nbr[nbr[i, slot], t] == i
    real = nbr != rows[:, None]
    if not torch.compiler.is_compiling() and not bool(hits.any(-1)[real].all()):
        raise ValueError("the neighbour lists are not symmetric: every edge i <- j needs j <- i")
    return torch.where(real, hits.int().argmax(-1), 0)


def edge_scores(q, k, a, b, h, p, w_err, w_len, w_out, b_out, nbr, length, reverse=None, slots=None):
    """``afmp.ops.edge.edge_scores`` by the Triton kernels (``reverse``: the scaffold's; ``slots`` unused)."""
    reverse = reverse_slots(nbr) if reverse is None else reverse
    return edge_scores_op(q, k, a, b, h, p, w_err, w_len, w_out, b_out, nbr, length, reverse)[0]


def gated_aggregate(s, keep, m, w_g, b_g, nbr, reverse=None, slots=None):
    """``afmp.ops.edge.gated_aggregate`` by the Triton kernels (``reverse``: the scaffold's; ``slots`` unused)."""
    reverse = reverse_slots(nbr) if reverse is None else reverse
    return gated_aggregate_op(s, keep, m, w_g, b_g, nbr, reverse)


def why_not(device: torch.device) -> str | None:
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRETED:
        return None
    return f"the Triton kernels need a CUDA device, not {device.type} (or TRITON_INTERPRET=1 on the CPU)"
