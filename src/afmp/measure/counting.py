"""What one step costs, counted op by op as PyTorch dispatches it (eager, unfused).

``CostMode`` is a TorchDispatchMode that sees every aten op of a forward (and, in
training, backward) pass and adds up three numbers:

- ``matmul_flops``: matmuls, convolutions and attention kernels, with the formulas
  of ``torch.utils.flop_counter`` (what FlopCounterMode reports), plus the CPU
  flash-attention kernels it does not know;
- ``total_flops``: the same plus the work FlopCounterMode counts as zero, one flop
  per element: pointwise ops per output element, reductions per input element,
  gathers per element gathered, scatters per element scattered; softmax and
  normalisation layers a fixed number per element (``PER_ELEMENT``). A matmul's
  bias add stays inside its matmul count, as in FlopCounterMode. A fused custom op
  counts no flops unless a formula is registered (``register_flops``); afmp's fused
  Triton ops are credited with the flops of their plain-PyTorch references, as
  FlashAttention is credited with attention's (end of this file);
- ``bytes``: bytes read and written by every op that touches memory: its tensor
  inputs plus its tensor outputs (views, and the uninitialised output of ``empty``,
  cost nothing; an expanded input counts its distinct elements once). This is the
  memory traffic of eager PyTorch, which a fused kernel would not pay.

Costs are affine in the batch size for per-sample models, so ``count_step`` counts
at batch 2 and 3 and extrapolates (exactly) to larger batches: cheap, and the
counting pass never needs a large batch's memory. (Not from batch 1: there, some
reshapes of a size-1 dimension are views that copy at any larger batch.)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.utils.flop_counter as fc
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map

from afmp.ops import edge
from afmp.ops.linear_attention import linear_attention_reference

aten = torch.ops.aten


# -- matmul-like ops: FlopCounterMode's formulas, plus the CPU flash-attention kernels --------
def _cpu_sdpa_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
    return fc.sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_sdpa_backward_flop(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return fc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def _raw(fn):
    fn._get_raw = True  # FlopCounterMode's marker: the formula takes tensors, not shapes
    return fn


# FlopCounterMode(custom_mapping=EXTRA_MATMUL) counts the same matmul flops as CostMode.
EXTRA_MATMUL = {
    aten._scaled_dot_product_flash_attention_for_cpu: _raw(_cpu_sdpa_flop),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _raw(_cpu_sdpa_backward_flop),
}
MATMUL = {**fc.flop_registry, **EXTRA_MATMUL}

# -- the rest: one flop per element, in the sense each family's comment gives -------------------
GATHER = {aten.index_select, aten.gather, aten.index, aten.embedding, aten.take}  # per output element
SCATTER = {  # per element of the source written or accumulated
    aten.index_add: "source",
    aten.index_add_: "source",
    aten.scatter_add: "src",
    aten.scatter_add_: "src",
    aten.scatter_reduce: "src",
    aten.scatter_reduce_: "src",
    aten.index_put: "values",
    aten.index_put_: "values",
    aten._index_put_impl_: "values",
    aten.index_copy: "source",
    aten.index_copy_: "source",
    aten.embedding_dense_backward: "grad_output",
}
# Composite kernels: flops per element of their first input (max, sub, exp, sum, div for
# softmax; mean, centre, square, sum, scale, affine for layer norm), backward likewise.
PER_ELEMENT = {
    aten._softmax: 5,
    aten._log_softmax: 5,
    aten._softmax_backward_data: 4,
    aten._log_softmax_backward_data: 4,
    aten.native_layer_norm: 7,
    aten.native_layer_norm_backward: 10,
    aten.native_batch_norm: 7,
    aten._native_batch_norm_legit: 7,
    aten._native_batch_norm_legit_no_training: 4,
    aten.native_batch_norm_backward: 10,
    aten.native_group_norm: 7,
    aten.native_group_norm_backward: 10,
    aten.topk: 1,
    aten.sort: 1,
}
REDUCTION_TAG = getattr(torch.Tag, "reduction", None)  # older torch releases lack the tag
# Ops whose first argument is only written, never read.
WRITE_ONLY_SELF = {aten.copy_, aten.fill_, aten.zero_, aten.normal_, aten.uniform_}
NO_TRAFFIC = {  # views not flagged as views, and allocations with no write
    aten._unsafe_view,
    aten.empty,
    aten.empty_like,
    aten.empty_strided,
    aten.new_empty,
    aten.new_empty_strided,
}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses (an expanded dimension counts once)."""
    distinct = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return distinct * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _arg(func, args, kwargs, name: str):
    """Argument ``name`` of an aten op call, positional or keyword."""
    if name in kwargs:
        return kwargs[name]
    names = [a.name for a in func._schema.arguments]
    return args[names.index(name)]


# Formulas for ops the tables above do not know, e.g. fused custom ops (torch.library):
# without one, such an op costs its inputs and outputs in bytes and no flops.
CUSTOM_FLOPS: dict = {}


def register_flops(op, formula: Callable[..., int | Costs]) -> None:
    """Count ``op`` (an OpOverloadPacket, e.g. torch.ops.afmp.gated_aggregate) as
    ``formula(*args, out=out, **kwargs)`` flops: an int counts as non-matmul flops, a
    ``Costs`` (e.g. ``reference_costs``) gives its matmul and total flops."""
    CUSTOM_FLOPS[op] = formula


def custom_flops(packet, args, kwargs, out) -> tuple[float, float]:
    """(matmul, total) flops of an op with a registered formula."""
    flops = CUSTOM_FLOPS[packet](*args, out=out, **kwargs)
    if isinstance(flops, Costs):
        return flops.matmul_flops, flops.total_flops
    return 0, flops


def other_flops(func, args, kwargs, out) -> int:
    """Non-matmul flops of one op (see the module docstring)."""
    packet = func._overloadpacket
    if packet in GATHER:
        return sum(t.numel() for t in _tensors(out)[:1])
    if packet in SCATTER:
        return _arg(func, args, kwargs, SCATTER[packet]).numel()
    if packet in PER_ELEMENT:
        return PER_ELEMENT[packet] * _tensors(args)[0].numel()
    if torch.Tag.pointwise in func.tags:
        return sum(t.numel() for t in _tensors(out)[:1])
    if REDUCTION_TAG is not None and REDUCTION_TAG in func.tags:
        return max((t.numel() for t in _tensors(args)), default=0)
    return 0


@dataclass
class Costs:
    matmul_flops: float = 0
    total_flops: float = 0
    bytes: float = 0
    by_op: Counter = field(default_factory=Counter)  # op name -> bytes, for a closer look
    ops: float = 0  # aten ops dispatched, views and allocations included: what eager pays per op

    def __add__(self, other: Costs) -> Costs:
        return Costs(
            self.matmul_flops + other.matmul_flops,
            self.total_flops + other.total_flops,
            self.bytes + other.bytes,
            self.by_op + other.by_op,
            self.ops + other.ops,
        )

    def scaled(self, factor: float) -> Costs:
        by_op = Counter({k: v * factor for k, v in self.by_op.items()})
        return Costs(
            self.matmul_flops * factor,
            self.total_flops * factor,
            self.bytes * factor,
            by_op,
            self.ops * factor,
        )


class CostMode(TorchDispatchMode):
    """Adds up the costs of every op dispatched while it is active (``.costs``)."""

    def __init__(self):
        super().__init__()
        self.costs = Costs()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.costs.ops += 1
        packet = func._overloadpacket
        if func.is_view or packet in NO_TRAFFIC:
            return out
        if packet in MATMUL:
            flops = MATMUL[packet](*args, **kwargs, out_val=out)
            self.costs.matmul_flops += flops
        elif packet in CUSTOM_FLOPS:
            matmul, flops = custom_flops(packet, args, kwargs, out)
            self.costs.matmul_flops += matmul
        else:
            flops = other_flops(func, args, kwargs, out)
        inputs = _tensors((args[1:], kwargs) if packet in WRITE_ONLY_SELF else (args, kwargs))
        moved = sum(tensor_bytes(t) for t in inputs) + sum(tensor_bytes(t) for t in _tensors(out))
        self.costs.total_flops += flops
        self.costs.bytes += moved
        self.costs.by_op[str(packet)] += moved
        return out

    def record(self, name: str, *, flops: float, moved: float, matmul: bool = True) -> None:
        """Add the cost of work the mode cannot see (a fused kernel run with counting paused)."""
        if matmul:
            self.costs.matmul_flops += flops
        self.costs.total_flops += flops
        self.costs.bytes += moved
        self.costs.by_op[name] += moved


_ACTIVE: list[CostMode] = []


def active_counter() -> CostMode | None:
    """The CostMode counting right now, if any (for modules that report their own cost)."""
    return _ACTIVE[-1] if _ACTIVE else None


def paused():
    """Run a block without counting (its cost is then given by ``CostMode.record``)."""
    return _disable_current_modes()


def count(fn: Callable[[], object]) -> Costs:
    """Costs of calling ``fn()`` once."""
    mode = CostMode()
    _ACTIVE.append(mode)
    try:
        with mode:
            fn()
    finally:
        _ACTIVE.pop()
    return mode.costs


def count_step(make_step: Callable[[int], Callable[[], object]], batch_size: int) -> Costs:
    """Costs of ``make_step(batch_size)()``, counted at batch 2 and 3 and extrapolated.

    ``make_step(b)`` returns a closure that runs one step on a batch of ``b``. Per-sample
    models cost c(b) = c(2) + (b - 2) (c(3) - c(2)) exactly; tests check it.
    """
    if batch_size <= 3:
        return count(make_step(batch_size))
    two, three = count(make_step(2)), count(make_step(3))
    return two + (three + two.scaled(-1)).scaled(batch_size - 2)


# -- fused custom ops, credited with the flops of the plain-PyTorch computation they replace ----
# FlashAttention's convention: a fused kernel does the useful arithmetic of its reference
# (the backward's recomputation is not counted), so it is credited with the flops CostMode
# counts for that reference at the same shapes; its bytes stay its own operands.
_REFERENCE_COSTS: dict = {}


def _signature(x):
    return (tuple(x.shape), x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor) else x


def reference_costs(fn: Callable, args: tuple, grad_outputs: tuple | None = None, wrt=()) -> Costs:
    """Costs of ``fn(*args)``, or with ``grad_outputs`` of its backward: the gradients of
    its outputs, weighted by ``grad_outputs``, with respect to ``args[i]`` for i in ``wrt``.

    Counted on fake tensors of the arguments' shapes, strides, dtypes and devices (no
    memory, no arithmetic), once per signature. The count runs in a fresh thread, which
    starts with none of the caller's dispatcher state: inside a TorchDispatchMode autograd
    is switched off, and the caller's counting mode must not see the reference's ops.
    Autocast is off there too, which changes no count (its casts count no flops).
    """
    key = (fn, tree_map(_signature, (args, grad_outputs, tuple(wrt))))
    if key not in _REFERENCE_COSTS:
        with ThreadPoolExecutor(max_workers=1) as thread:
            _REFERENCE_COSTS[key] = thread.submit(_count_reference, fn, args, grad_outputs, wrt).result()
    return _REFERENCE_COSTS[key]


def _count_reference(fn, args, grad_outputs, wrt) -> Costs:
    def fake(x):
        if not isinstance(x, torch.Tensor):
            return x
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)

    with FakeTensorMode():
        args = tree_map(fake, args)
        if grad_outputs is None:
            return count(lambda: fn(*args))
        inputs = [args[i].requires_grad_() for i in wrt if args[i] is not None]
        outputs = fn(*args)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        grads = tree_map(fake, grad_outputs)
        return count(lambda: torch.autograd.grad(outputs, inputs, grads, allow_unused=True))


def _register_fused_ops() -> None:
    try:  # triton is optional: without it there are no fused ops to count
        from afmp.ops import triton_edge, triton_linear_attention  # noqa: F401 (define the ops)
    except ImportError:
        return
    ops = torch.ops.afmp

    def lists(mask):
        """Stand-ins for the reference's (N, K) neighbour lists and lengths: the fused edge
        ops address a stencil instead, and reference_costs only reads their shapes."""
        return mask.new_empty(mask.shape, dtype=torch.long), mask.new_empty(mask.shape, dtype=torch.float32)

    # The edge ops take (..., mask, height, width, offsets[, lengths]) where the reference
    # takes (..., nbr[, length]). The backward ops take the incoming gradients first, then
    # what the forward saved; ``wrt`` lists the reference's inputs they return gradients
    # for (all but nbr, length and keep: constants, as in the model).
    register_flops(
        ops.edge_scores,
        lambda *args, out: reference_costs(edge.padded_edge_scores, (*args[:10], *lists(args[10]))),
    )
    register_flops(
        ops.edge_scores_backward,  # (ds, err, *saved without b_out); its gradient out[9] has b_out's shape
        lambda ds, err, *saved, out: reference_costs(
            edge.padded_edge_scores, (*saved[:9], out[9], *lists(saved[9])), (ds,), wrt=range(10)
        ),
    )
    register_flops(
        ops.gated_aggregate,
        lambda s, keep, m, w_g, b_g, mask, *stencil, out: reference_costs(
            edge.padded_gated_aggregate, (s, keep, m, w_g, b_g, lists(mask)[0])
        ),
    )
    register_flops(
        ops.gated_aggregate_backward,
        lambda dout, dgm, s, keep, m, w_g, b_g, mask, *stencil, out: reference_costs(
            edge.padded_gated_aggregate, (s, keep, m, w_g, b_g, lists(mask)[0]), (dout, dgm), wrt=(0, 2, 3, 4)
        ),
    )
    register_flops(
        ops.linear_attention_fwd, lambda *args, out: reference_costs(linear_attention_reference, args)
    )
    register_flops(
        ops.linear_attention_bwd,
        lambda q, k, v, s, z, dout, eps, out: reference_costs(
            linear_attention_reference, (q, k, v, eps), (dout,), wrt=(0, 1, 2)
        ),
    )


_register_fused_ops()
