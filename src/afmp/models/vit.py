"""One Vision Transformer skeleton; the token mixer is passed in (afmp.models.linear_attention).

Patch embedding, a class token, a learned position embedding (resampled when the
token grid differs from the one it was made for), pre-norm blocks
``x + attn(norm(x), grid)``, ``x + mlp(norm(x))``, a final norm and a linear head on
the class token. ``Config.attention`` names the mixer:

    softmax      SDPA softmax attention                        (vit_baseline_*)
    ripple       RippleAttention, ``ripple_stages`` pools       (ripple_vit_*)
    hydra        the seed's HydraAttention, ``hydra_branches``,  (hydra_vit_*)
                 ``hydra_rank`` (at the seed's parameter budget)
    hydra_bolya  Bolya et al.'s Hydra attention                 (hydra_bolya_vit_*)

Presets: ``*_tiny`` (CIFAR 32x32, patch 4, trains on a CPU), ``*_cifar`` (the
Linear-ViT seed's size: dim 384, depth 12, 6 heads) and ``*_tin`` (64x64 Tiny
ImageNet, patch 8, 200 classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, trunc_normal_
from torch import nn

from afmp.layers import ClassifierMixin, PatchEmbed, check_image_batch, init_linear_weights, make_head
from afmp.models.linear_attention import (
    BolyaHydraAttention,
    HydraAttention,
    RippleAttention,
    SoftmaxAttention,
)
from afmp.ops.linear_attention import linear_attention_backend_names
from afmp.registry import check_one_of, check_positive_ints, register_model

ATTENTIONS = ("softmax", "ripple", "hydra", "hydra_bolya")


def attention_layer(cfg) -> partial:
    """A factory ``dim -> token mixer`` for ``cfg.attention``, with the options that mixer takes."""
    if cfg.attention == "softmax":
        return partial(SoftmaxAttention, num_heads=cfg.num_heads)
    if cfg.attention == "ripple":
        return partial(
            RippleAttention, num_heads=cfg.num_heads, stages=cfg.ripple_stages, backend=cfg.backend
        )
    if cfg.attention == "hydra":
        return partial(
            HydraAttention,
            num_heads=cfg.num_heads,
            branches=cfg.hydra_branches,
            rank=cfg.hydra_rank,
            backend=cfg.backend,
        )
    if cfg.attention == "hydra_bolya":
        return partial(BolyaHydraAttention)
    raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {cfg.attention!r}")


class Block(nn.Module):
    """Pre-norm transformer block around any token mixer ``attn_layer(dim)``."""

    def __init__(self, dim: int, *, attn_layer, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn_layer(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, round(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(ClassifierMixin, nn.Module):
    POOL = "token"  # the class token is the pooled feature

    @dataclass
    class Config:
        img_size: int = 32
        patch_size: int = 4
        in_chans: int = 3
        num_classes: int = 100
        embed_dim: int = 384
        depth: int = 12
        num_heads: int = 6
        mlp_ratio: float = 4.0
        attention: str = "softmax"  # one of ATTENTIONS
        ripple_stages: int = 3  # RippleAttention: 2x2 pooling stages (8x8 -> 4x4, 2x2, 1x1)
        hydra_branches: int = 4  # HydraAttention: query branches sharing K/V
        hydra_rank: int = 32  # HydraAttention: rank of each branch's own query term
        drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this at the last block
        backend: str = "auto"  # linear attention: see afmp.ops.linear_attention

        def __post_init__(self):
            check_positive_ints(
                self,
                "img_size",
                "patch_size",
                "in_chans",
                "embed_dim",
                "depth",
                "num_heads",
                "ripple_stages",
                "hydra_branches",
                "hydra_rank",
            )
            check_positive_ints(self, "num_classes", minimum=0)  # 0: no classifier, features out
            if self.img_size % self.patch_size:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
            if self.embed_dim % self.num_heads:
                raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
            check_one_of(self, "attention", ATTENTIONS)
            if not self.mlp_ratio > 0:
                raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
            if not 0.0 <= self.drop_path_rate < 1.0:
                raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
            check_one_of(self, "backend", linear_attention_backend_names())

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.num_features = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.patch_embed = PatchEmbed(in_chans=cfg.in_chans, dim=cfg.embed_dim, patch_size=cfg.patch_size)
        side = cfg.img_size // cfg.patch_size
        self.pos_grid = (side, side)  # the grid pos_embed was made for
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + side * side, cfg.embed_dim))
        attn_layer = attention_layer(cfg)
        self.blocks = nn.ModuleList(
            Block(
                cfg.embed_dim,
                attn_layer=attn_layer,
                mlp_ratio=cfg.mlp_ratio,
                drop_path=cfg.drop_path_rate * i / max(cfg.depth - 1, 1),
            )
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.global_pool = self.POOL
        self.head = make_head(cfg.embed_dim, cfg.num_classes)
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_linear_weights)

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == self.pos_grid:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid), old_size=list(self.pos_grid))

    def forward_features(self, x: torch.Tensor, return_aux: bool = False):
        """Normalised tokens, class token first, (B, 1 + N, C); with ``return_aux`` also {"grid": grid}."""
        check_image_batch(x, self.cfg.in_chans, self.cfg.patch_size)
        tokens, grid = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self._pos_embed(grid)
        for block in self.blocks:
            x = block(x, grid)
        x = self.norm(x)
        return (x, {"grid": grid}) if return_aux else x

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features[:, 0] if self.global_pool else features
        return pooled if pre_logits else self.head(pooled)


# -- presets --------------------------------------------------------------------------------
# One line per preset. Sizes: "tiny" (CIFAR, 32², small), "cifar" (CIFAR, 32², DeiT-Small's
# width and depth), "tin" (Tiny ImageNet, 64², the same); the family names the attention.
_TINY = dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, num_classes=100)
_CIFAR = dict(
    img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6, num_classes=100, drop_path_rate=0.1
)
_TIN = dict(
    img_size=64, patch_size=8, embed_dim=384, depth=12, num_heads=6, num_classes=200, drop_path_rate=0.1
)

register_model("vit_baseline_tiny", VisionTransformer, data="cifar100", attention="softmax", **_TINY)
register_model("vit_baseline_cifar", VisionTransformer, data="cifar100", attention="softmax", **_CIFAR)
register_model("vit_baseline_tin", VisionTransformer, data="tiny-imagenet", attention="softmax", **_TIN)
register_model("ripple_vit_tiny", VisionTransformer, data="cifar100", attention="ripple", **_TINY)
register_model("ripple_vit_cifar", VisionTransformer, data="cifar100", attention="ripple", **_CIFAR)
register_model("ripple_vit_tin", VisionTransformer, data="tiny-imagenet", attention="ripple", **_TIN)
register_model("hydra_vit_tiny", VisionTransformer, data="cifar100", attention="hydra", hydra_rank=8, **_TINY)
register_model("hydra_vit_cifar", VisionTransformer, data="cifar100", attention="hydra", **_CIFAR)
register_model("hydra_vit_tin", VisionTransformer, data="tiny-imagenet", attention="hydra", **_TIN)
register_model("hydra_bolya_vit_tiny", VisionTransformer, data="cifar100", attention="hydra_bolya", **_TINY)
register_model("hydra_bolya_vit_cifar", VisionTransformer, data="cifar100", attention="hydra_bolya", **_CIFAR)
register_model(
    "hydra_bolya_vit_tin", VisionTransformer, data="tiny-imagenet", attention="hydra_bolya", **_TIN
)
