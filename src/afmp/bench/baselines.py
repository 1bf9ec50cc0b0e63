"""Bench-only baselines, built from existing libraries (not in the model registry).

- ``deit_tiny_sdpa`` / ``deit_small_sdpa``: timm's DeiT with fused attention
  (``F.scaled_dot_product_attention``: flash / memory-efficient kernels);
- ``deit_tiny_unfused`` / ``deit_small_unfused``: the same weights layout with timm's
  unfused attention (``fused_attn = False``: the N x N matrix is materialised);
- ``vit_natten_flex``: DeiT-Tiny's shape without a class token (mean-pooled), each
  attention restricted to a 2-D neighbourhood window (NATTEN's: a w x w window
  centred on the query, shifted inwards at the borders), run by FlexAttention with
  a block mask. Option ``window`` (default 7).

Each builder takes (size, num_classes, device, **options) and returns (module, tokens),
the module on ``device``.
"""

from __future__ import annotations

from functools import cache

import timm
import torch
from torch import nn

from afmp.measure import counting

DEIT = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
}


def _check_size(size: int, patch: int = 16) -> None:
    if size % patch:
        raise ValueError(f"image size {size} is not divisible by the patch size {patch}")


def deit(variant: str, fused: bool):
    def build(size: int, num_classes: int, device) -> tuple[nn.Module, int]:
        _check_size(size)
        model = timm.create_model(
            f"deit_{variant}_patch16_224", pretrained=False, img_size=size, num_classes=num_classes
        )
        for block in model.blocks:
            block.attn.fused_attn = fused
        return model.to(device), (size // 16) ** 2

    return build


# -- neighbourhood attention through FlexAttention -----------------------------------------
@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # FlexAttention is only a fused kernel when compiled; eagerly it materialises N x N scores.
    return torch.compile(flex_attention, dynamic=False)


def neighbourhood_mask_mod(height: int, width: int, window: int):
    """FlexAttention mask_mod of NATTEN's w x w window on a height x width grid (row-major)."""

    def mask_mod(b, h, q_idx, kv_idx):
        qr, qc, kr, kc = q_idx // width, q_idx % width, kv_idx // width, kv_idx % width
        r0 = (qr - window // 2).clamp(0, height - window)
        c0 = (qc - window // 2).clamp(0, width - window)
        return (kr >= r0) & (kr < r0 + window) & (kc >= c0) & (kc < c0 + window)

    return mask_mod


def neighbourhood_block_mask(height: int, width: int, window: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    n = height * width
    return create_block_mask(neighbourhood_mask_mod(height, width, window), None, None, n, n, device=device)


class _CountedFlex(torch.autograd.Function):
    """FlexAttention run with cost counting paused; its cost is recorded as the kernel's.

    The fused kernel computes every visited (query block, key block) tile in full, so
    its flops are dense attention's times the fraction of tiles the block mask
    visits; its memory traffic is its inputs and outputs (tiles are re-read from cache).
    """

    @staticmethod
    def forward(ctx, q, k, v, block_mask):
        density = 1.0 - block_mask.sparsity() / 100.0
        with counting.paused(), torch.enable_grad():
            inner = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
            out = _compiled_flex()(*inner, block_mask=block_mask)
        flops = density * counting.fc.sdpa_flop_count(q.shape, k.shape, v.shape)
        moved = sum(counting.tensor_bytes(t) for t in (q, k, v, out))
        counting.active_counter().record("flex_attention", flops=flops, moved=moved)
        ctx.inner, ctx.out, ctx.density = inner, out, density
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.inner
        with counting.paused():
            grads = torch.autograd.grad(ctx.out, (q, k, v), grad_out)
        flops = ctx.density * counting.fc.sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape)
        moved = sum(counting.tensor_bytes(t) for t in (q, k, v, ctx.out, grad_out, *grads))
        counting.active_counter().record("flex_attention_backward", flops=flops, moved=moved)
        return (*grads, None)


class FlexNeighbourhoodAttention(nn.Module):
    """Replaces a timm ``Attention`` (keeps its qkv and proj): attention within a window."""

    def __init__(self, attn: nn.Module, block_mask):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.block_mask = block_mask  # built once, on the model's device (not a buffer: .to() keeps it)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if counting.active_counter() is not None:
            out = _CountedFlex.apply(q, k, v, self.block_mask)
        else:
            out = _compiled_flex()(q, k, v, block_mask=self.block_mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def vit_natten_flex(size: int, num_classes: int, device, window: int = 7) -> tuple[nn.Module, int]:
    _check_size(size)
    grid = size // 16
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd positive integer, got {window!r}")
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=size, num_classes=num_classes, class_token=False, global_pool="avg", **DEIT["tiny"]
    )
    block_mask = neighbourhood_block_mask(grid, grid, min(window, grid), device)
    for block in model.blocks:
        block.attn = FlexNeighbourhoodAttention(block.attn, block_mask)
    return model.to(device), grid * grid


BASELINES = {
    "deit_tiny_sdpa": deit("tiny", fused=True),
    "deit_tiny_unfused": deit("tiny", fused=False),
    "deit_small_sdpa": deit("small", fused=True),
    "deit_small_unfused": deit("small", fused=False),
    "vit_natten_flex": vit_natten_flex,
}
