"""Backend ``triton`` of AFMP's edge stage: the kernels of ``afmp.ops.triton_edge_kernels``
launched over a stencil scaffold, as custom ops with autograd.

Same function as ``afmp.ops.stencil_edge`` (and so as the reference ``afmp.ops.edge``) on
a scaffold that is a stencil. The kernels are wrapped as ``torch.library`` custom ops (``afmp::edge_scores``,
``afmp::gated_aggregate`` and their backwards) with fake implementations, so
torch.compile traces a model through them without graph breaks; the stencil reaches
them as plain ints and floats (grid height and width, flattened offsets, lengths).
"""

import functools
from typing import NamedTuple

import torch
import triton

from afmp.ops import stencil_edge
from afmp.ops import triton_edge_kernels as kernels
from afmp.ops.backends import triton_why_not
from afmp.scaffold import Scaffold
from afmp.utils.environment import triton_interpreted

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
    kernels.scores_fwd_kernel[(triton.cdiv(n, BLOCK_T), batch)](
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
    kernels.scores_bwd_kernel[(programs, batch)](
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
    kernels.agg_fwd_kernel[(triton.cdiv(n, BLOCK_T), batch)](
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
    kernels.agg_bwd_kernel[(programs, batch)](
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
