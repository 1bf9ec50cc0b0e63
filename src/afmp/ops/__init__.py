"""Named backends for AFMP's per-edge stage, beside the plain-PyTorch reference.

Each backend provides ``edge_scores`` and ``gated_aggregate`` with the signatures of
``afmp.ops.edge`` and a ``why_not(device)`` that returns None when it can run there,
or the reason it cannot. ``auto`` picks the first that can run, in PREFERENCE order;
on the CPU it picks ``packed`` (plain PyTorch over the real edges only). Backends take
the scaffold's ``reverse`` and ``slots`` as keywords: the Triton kernels' backward uses
the first, the packed backend the second, the reference neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from afmp.ops import edge, packed_edge


@dataclass(frozen=True)
class EdgeBackend:
    name: str
    edge_scores: Callable
    gated_aggregate: Callable
    why_not: Callable[[torch.device], str | None]


EDGE_BACKENDS: dict[str, EdgeBackend] = {
    "reference": EdgeBackend("reference", edge.edge_scores, edge.gated_aggregate, lambda device: None),
    "packed": EdgeBackend(
        "packed", packed_edge.edge_scores, packed_edge.gated_aggregate, lambda device: None
    ),
}
# On CUDA the packed backend is not preferred: it was only measured on the CPU.
PREFERENCE: list[str] = ["reference", "packed"]


def register_edge_backend(backend: EdgeBackend, preferred: bool = False) -> None:
    EDGE_BACKENDS[backend.name] = backend
    if preferred:
        PREFERENCE.insert(0, backend.name)
    else:
        PREFERENCE.append(backend.name)


def edge_backend_names() -> list[str]:
    return ["auto", *EDGE_BACKENDS]


def select_edge_backend(name: str, device: torch.device | str) -> EdgeBackend:
    """The backend called ``name`` (or the best that can run on ``device`` for ``auto``)."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cpu":  # Triton runs on the CPU only through an interpreter, for tests
            return EDGE_BACKENDS["packed"]
        for candidate in PREFERENCE:
            if EDGE_BACKENDS[candidate].why_not(device) is None:
                return EDGE_BACKENDS[candidate]
        raise RuntimeError(f"no edge backend can run on {device}")  # unreachable: reference always can
    if name not in EDGE_BACKENDS:
        raise ValueError(f"unknown edge backend {name!r}; choose one of {', '.join(edge_backend_names())}")
    backend = EDGE_BACKENDS[name]
    reason = backend.why_not(device)
    if reason is not None:
        raise RuntimeError(f"edge backend {name!r} cannot run on {device}: {reason}")
    return backend


try:  # the Triton kernels are optional: without triton, only the reference
    from afmp.ops import triton_edge
except ImportError:
    triton_edge = None
else:
    register_edge_backend(
        EdgeBackend("triton", triton_edge.edge_scores, triton_edge.gated_aggregate, triton_edge.why_not),
        preferred=True,
    )
