"""Non-causal linear attention with the feature map phi(x) = [relu(x), relu(-x)].

For each head, with phi applied to every query and key (2D features from D)::

    out_i = phi(q_i)^T S / (phi(q_i)^T z + eps),   S = sum_j phi(k_j) v_j^T,   z = sum_j phi(k_j)

which is softmax-free attention with the kernel phi(q)^T phi(k) >= 0, computed in
O(N) through the state (S, z) instead of the N x M kernel matrix. Tensors are
(B, H, N, D) for queries and (B, H, M, D) for keys and values.

Backends by name, a family like the edge stage's (afmp.ops.backends): ``reference``
(plain PyTorch, runs anywhere), ``triton`` (the fused kernel in
afmp.ops.triton_linear_attention: CUDA, or the CPU under TRITON_INTERPRET=1) and
``auto`` (triton on CUDA, reference elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from afmp.ops.backends import Backend, BackendFamily, triton_why_not

try:  # triton is an optional dependency; the reference needs none
    from afmp.ops import triton_linear_attention as _triton_impl
except ImportError as err:  # pragma: no cover - depends on the installation
    _triton_impl, _TRITON_IMPORT_ERROR = None, str(err)


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [relu(x), relu(-x)] on the last dimension: non-negative, 2D features from D."""
    return torch.cat([F.relu(x), F.relu(-x)], dim=-1)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Sums over N tokens in bf16/fp16 lose digits: the reference accumulates in float32 at least.
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected q, k, v of shape (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "expected q (B, H, N, D), k (B, H, M, D) and v (B, H, M, Dv); "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The O(N) form in plain PyTorch (float32 accumulation, autocast off); returns q's dtype."""
    check_qkv(q, k, v)
    work = _work_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        phi_q, phi_k = feature_map(q.to(work)), feature_map(k.to(work))
        state = phi_k.transpose(-2, -1) @ v.to(work)  # S: (B, H, 2D, Dv)
        z = phi_k.sum(dim=-2)  # (B, H, 2D)
        num = phi_q @ state
        den = (phi_q * z.unsqueeze(-2)).sum(-1, keepdim=True) + eps
        return (num / den).to(q.dtype)


def linear_attention_quadratic(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The same attention through the explicit N x M kernel matrix phi(q) phi(k)^T (for tests)."""
    check_qkv(q, k, v)
    work = _work_dtype(q.dtype)
    scores = feature_map(q.to(work)) @ feature_map(k.to(work)).transpose(-2, -1)  # (B, H, N, M)
    return (scores @ v.to(work) / (scores.sum(-1, keepdim=True) + eps)).to(q.dtype)


# -- backends -------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LinearAttentionBackend(Backend):
    attend: Callable  # (q, k, v, eps) -> out


def _triton_why_not(device: torch.device) -> str | None:
    if _triton_impl is None:
        return f"triton is not importable ({_TRITON_IMPORT_ERROR}); pip install triton"
    return triton_why_not(device)


def _triton(q, k, v, eps):
    return _triton_impl.linear_attention_triton(q, k, v, eps)


# The Triton kernel on CUDA, the reference elsewhere: the interpreter is for checking the
# kernel, far too slow to train with, so ``auto`` never picks it on the CPU.
LINEAR_ATTENTION_BACKENDS = BackendFamily(
    "linear-attention",
    {("cuda", False): [("triton", 0)], ("cuda", True): [("triton", 0)]},
)
LINEAR_ATTENTION_BACKENDS.register(
    LinearAttentionBackend(name="reference", attend=linear_attention_reference)
)
LINEAR_ATTENTION_BACKENDS.register(
    LinearAttentionBackend(name="triton", attend=_triton, why_not=_triton_why_not)
)


def linear_attention_backend_names() -> list[str]:
    return LINEAR_ATTENTION_BACKENDS.names()


def select_linear_attention(name: str, device: torch.device | str) -> Callable:
    """The function ``(q, k, v, eps) -> out`` of backend ``name`` on ``device`` (``auto``:
    the Triton kernel on CUDA, the reference elsewhere); an explicit name that cannot
    run on ``device`` is an error that says why."""
    return LINEAR_ATTENTION_BACKENDS.select(name, device).attend


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6, backend: str = "auto"
) -> torch.Tensor:
    """Non-causal linear attention of (B, H, N, D) queries over (B, H, M, D) keys and values."""
    return select_linear_attention(backend, q.device)(q, k, v, eps)
