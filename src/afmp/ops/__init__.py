"""Named backends for AFMP's per-edge stage, beside the plain-PyTorch reference.

Each backend provides ``edge_scores`` and ``gated_aggregate`` with the signatures of
``afmp.ops.edge`` (the scaffold as last argument), ``why_not(device)`` and
``input_why_not(scaffold)`` (afmp.ops.backends: None when it can run there and on
that scaffold, or the reason it cannot).

    reference  padded neighbour lists, plain PyTorch: (B, N, K, C) gathers
    gather     the same gathers in few, batched ops, with a hand-written backward: small grids;
               in a model, the whole layer is one op (afmp.ops.fused_layer)
    packed     the real edges only, plain PyTorch: index_select / index_add
    stencil    shifted views of the token grid, plain PyTorch with a hand-written
               backward; needs a stencil scaffold (every grid layout is one)
    triton     Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1 for tests)

``auto`` takes the first of ``AUTO[device type, compiled]`` that can run and is meant
for a grid of that many tokens: the order is the measured one, fastest first
(docs/results.md, "Which backend auto picks"); on CUDA only backends with a GPU record
(``CUDA_RECORD``). The choice is made inside the model's
forward, so under torch.compile it is the compiled order (``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from afmp.ops import edge, fused_layer, gather_edge, packed_edge, stencil_edge
from afmp.ops.backends import Backend, BackendFamily
from afmp.scaffold import Scaffold


def _as_given(sc, h):
    return sc


@dataclass(frozen=True, kw_only=True)
class EdgeBackend(Backend):
    edge_scores: Callable
    gated_aggregate: Callable
    # The whole layer (edge.layer_of): by default the two halves above with the projections,
    # top-k and update around them in plain PyTorch, or a backend's own single op
    # (afmp.ops.fused_layer). Models call it on ``prepare(scaffold, states)``, what the
    # backend derives from the scaffold once per forward (by default the scaffold itself).
    layer: Callable | None = None
    prepare: Callable = _as_given

    def __post_init__(self):
        if self.layer is None:
            object.__setattr__(self, "layer", edge.layer_of(self.edge_scores, self.gated_aggregate))


# Fastest first, by the training-step measurements in docs/results.md ("Which backend auto
# picks", "AFMP at the sizes people train"), keyed by (device type, compiled): (backend,
# fewest tokens per image it is taken for). On the CPU the stencil wins from a 10x10 grid up
# (and uses under half the memory); below, gather's few batched ops win (8% at 8x8, 8-30%
# over packed from 4x4 to 16x16). Compiled, the stencil wins at every size measured: Inductor
# fuses its per-offset passes, while a compiled gather step was slower than an eager one
# (docs/results.md, "Compiling the training step": 7x7, and 4x4 in a loaded run).
CPU_SMALL_GRID = 100
# On CUDA, auto takes only backends in CUDA_RECORD (a test holds it to that).
AUTO: dict[tuple[str, bool], list[tuple[str, int]]] = {
    ("cpu", False): [("stencil", CPU_SMALL_GRID), ("gather", 0), ("reference", 0)],
    ("cpu", True): [("stencil", 0), ("gather", 0), ("reference", 0)],
    ("cuda", False): [("stencil", 0), ("reference", 0)],
    ("cuda", True): [("stencil", 0), ("reference", 0)],
}
# What auto on CUDA relies on: where each backend it may take was checked on a GPU.
# scripts/gpu_bench_all.sh first checks every backend against the reference on the device
# (scripts/gpu_backend_check.py, float32 and bfloat16, forward and every gradient); a backend
# joins this record, and may then join AUTO's CUDA rows, once it passed there, with the
# commit and the GPU named in docs/results.md ("Backends checked on a GPU").
H200_CHECK = (
    "matched the reference on an H200 (torch 2.11, triton 3.6) at 619f8e1 on 2026-12-04, fp32 and bf16"
)
CUDA_RECORD: dict[str, str] = {
    "reference": "ran on an H100 80GB (torch 2.11) on 2026-11-23: docs/results.md, 'AFMP's per-edge stage alone'",
    "stencil": H200_CHECK + ": docs/results.md, 'Backends checked on a GPU'",
    "gather": H200_CHECK + " (its two halves; its whole-layer op, ops/fused_layer.py, has not run on a GPU)",
    "packed": H200_CHECK,
    "triton": H200_CHECK + " (compiled kernels, not the interpreter); not yet timed there",
}

EDGE_BACKENDS = BackendFamily("edge", AUTO)
EDGE_BACKENDS.register(
    EdgeBackend(name="reference", edge_scores=edge.edge_scores, gated_aggregate=edge.gated_aggregate)
)
EDGE_BACKENDS.register(
    EdgeBackend(
        name="packed", edge_scores=packed_edge.edge_scores, gated_aggregate=packed_edge.gated_aggregate
    )
)
EDGE_BACKENDS.register(
    EdgeBackend(
        name="gather",
        edge_scores=gather_edge.edge_scores,
        gated_aggregate=gather_edge.gated_aggregate,
        layer=fused_layer.layer,
        prepare=fused_layer.prepare,
    )
)
EDGE_BACKENDS.register(
    EdgeBackend(
        name="stencil",
        edge_scores=stencil_edge.edge_scores,
        gated_aggregate=stencil_edge.gated_aggregate,
        input_why_not=stencil_edge.scaffold_why_not,
    )
)


def register_edge_backend(backend: EdgeBackend) -> None:
    EDGE_BACKENDS.register(backend)


def edge_backend_names() -> list[str]:
    return EDGE_BACKENDS.names()


def select_edge_backend(name: str, device: torch.device | str, sc: Scaffold | None = None) -> EdgeBackend:
    """The backend called ``name``, or for ``auto`` the fastest that runs on ``device`` and ``sc``."""
    return EDGE_BACKENDS.select(name, device, sc, size=sc.num_tokens if sc is not None else 0)


try:  # the Triton kernels are optional: without triton, no ``triton`` backend
    from afmp.ops import triton_edge
except ImportError:
    triton_edge = None
else:
    EDGE_BACKENDS.register(
        EdgeBackend(
            name="triton",
            edge_scores=triton_edge.edge_scores,
            gated_aggregate=triton_edge.gated_aggregate,
            why_not=triton_edge.why_not,
            input_why_not=stencil_edge.scaffold_why_not,  # the kernels address a grid
        )
    )
