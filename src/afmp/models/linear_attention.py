"""Token mixers for the ViT skeleton (afmp.models.vit): softmax attention and three linear ones.

Every block maps (B, T, C) tokens to (B, T, C) and is called as ``block(x, grid)``,
where the first ``T - gh * gw`` tokens are prefix tokens (the class token) and the
rest a row-major gh x gw grid; only RippleAttention uses the grid.

- SoftmaxAttention: multi-head softmax attention through SDPA, O(T^2).
- RippleAttention: full-resolution queries attend, by linear attention, to keys and
  values pooled over the token grid in stages (a pyramid of 2 x 2 average pools,
  the class token kept apart); a learned expansion brings the finest pooled values
  back to the full grid and adds them to the output.
- HydraAttention (the Linear-ViT seed's): several query branches share one K/V
  projection, each branch's queries the shared ones plus a low-rank term of its own;
  linear attention per branch; the branches are averaged and projected.
- BolyaHydraAttention (Bolya et al. 2022, "Hydra Attention"): cosine-normalised q
  and k, as many heads as channels: out = q^ * sum_n (k^_n * v_n), O(TC).

Linear attention uses phi(x) = [relu(x), relu(-x)] (afmp.ops.linear_attention) and
its backend (reference / triton / auto).

Letters: B batch, T tokens, C channels, H heads, Dh = C / H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from afmp.ops.linear_attention import linear_attention


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H * Dh) -> (B, H, T, Dh)."""
    b, t, c = x.shape
    return x.view(b, t, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, Dh) -> (B, T, H * Dh)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def ripple_pool(
    tokens: torch.Tensor, grid: tuple[int, int], stages: int
) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """2 x 2 average pools of a token grid, ``stages`` times (fewer once the grid is 1 x 1).

    ``tokens``: (..., gh * gw, D), row-major. Returns one (pooled tokens, grid) per stage,
    finest first. An odd side keeps its last row/column as a window of its own (ceil mode:
    partial windows average the tokens they cover).
    """
    gh, gw = grid
    if tokens.shape[-2] != gh * gw:
        raise ValueError(f"expected {gh}x{gw}={gh * gw} grid tokens, got {tokens.shape[-2]}")
    lead, dim = tokens.shape[:-2], tokens.shape[-1]
    x = tokens.reshape(-1, gh, gw, dim).permute(0, 3, 1, 2)
    out = []
    for _ in range(stages):
        if x.shape[-2:] == (1, 1):
            break
        x = F.avg_pool2d(x, kernel_size=2, ceil_mode=True)
        h, w = x.shape[-2:]
        out.append((x.permute(0, 2, 3, 1).reshape(*lead, h * w, dim), (h, w)))
    return out


def hydra_bolya(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bolya et al.'s Hydra attention on (B, T, C): out = q^ * sum_t (k^_t * v_t), q^, k^ unit L2 per token."""
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return q * (k * v).sum(dim=-2, keepdim=True)


class SoftmaxAttention(nn.Module):
    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class RippleAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        stages: int = 3,
        qkv_bias: bool = True,
        backend: str = "auto",
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_heads, self.stages, self.backend, self.eps = num_heads, stages, backend, eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # Learned expansion: depthwise 3x3 conv over the finest pooled values, upsampled to the grid.
        self.expand = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, t, c = x.shape
        prefix = t - grid[0] * grid[1]
        if prefix < 0:
            raise ValueError(f"expected at least {grid[0] * grid[1]} tokens for grid {grid}, got {t}")
        q, k, v = (split_heads(u, self.num_heads) for u in self.qkv(x).chunk(3, dim=-1))
        # Prefix tokens are kept apart from the pooling and always attended.
        k_stages = ripple_pool(k[:, :, prefix:], grid, self.stages)
        v_stages = ripple_pool(v[:, :, prefix:], grid, self.stages)
        if not v_stages:  # a 1 x 1 grid has nothing to pool: attend to it as it is
            k_stages, v_stages = [(k[:, :, prefix:], grid)], [(v[:, :, prefix:], grid)]
        keys = torch.cat([k[:, :, :prefix], *(s for s, _ in k_stages)], dim=2)
        values = torch.cat([v[:, :, :prefix], *(s for s, _ in v_stages)], dim=2)
        out = merge_heads(linear_attention(q, keys, values, eps=self.eps, backend=self.backend))

        finest, (h, w) = v_stages[0]
        finest = merge_heads(finest).transpose(1, 2).reshape(b, c, h, w)
        ripple = self.expand(F.interpolate(finest, size=grid, mode="nearest"))
        ripple = ripple.flatten(2).transpose(1, 2)  # (B, gh * gw, C)
        out = torch.cat([out[:, :prefix], out[:, prefix:] + ripple], dim=1)
        return self.proj(out)


class HydraAttention(nn.Module):
    """The Linear-ViT seed's HydraAttention at its parameter budget (+5.5% over softmax
    attention's ViT at the seed's size): ``branches`` query branches share one K/V.

    Branch b's queries are the shared query projection plus a rank-``rank`` term of its
    own, ``q_b = W_q x + U_b V_b x``: the branches ask different questions ("query
    diversity") for 2 * branches * rank * C parameters, not branches * C^2. Each branch
    runs linear attention on the shared K/V; the fusion averages the branches and projects.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        branches: int = 4,
        rank: int = 32,
        qkv_bias: bool = True,
        backend: str = "auto",
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_heads, self.branches, self.rank, self.backend, self.eps = (
            num_heads,
            branches,
            rank,
            backend,
            eps,
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # the shared projections
        self.down = nn.Linear(dim, branches * rank, bias=False)  # V_b, all branches at once
        self.up = nn.Parameter(torch.empty(branches, rank, dim))  # U_b
        nn.init.trunc_normal_(self.up, std=0.02)
        self.proj = nn.Linear(dim, dim)

    def branch_queries(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """(B, T, branches, C): the shared queries ``q`` (B, T, C) plus each branch's own term."""
        low = self.down(x).unflatten(-1, (self.branches, self.rank))  # (B, T, branches, rank)
        return q.unsqueeze(2) + torch.einsum("btnr,nrc->btnc", low, self.up)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # Branches become extra heads, branch-major: head n * H + h of q reads K/V head h.
        q = self.branch_queries(x, q).reshape(b, t, self.branches * self.num_heads, c // self.num_heads)
        k, v = (split_heads(u, self.num_heads).repeat(1, self.branches, 1, 1) for u in (k, v))
        out = linear_attention(q.transpose(1, 2), k, v, eps=self.eps, backend=self.backend)
        out = out.unflatten(1, (self.branches, self.num_heads)).mean(1)  # fusion: the branches' mean
        return self.proj(merge_heads(out))


class BolyaHydraAttention(nn.Module):
    def __init__(self, dim: int, *, qkv_bias: bool = True):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.proj(hydra_bolya(*self.qkv(x).chunk(3, dim=-1)))
