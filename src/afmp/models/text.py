"""Sequence classifiers: attention-free neighbour diffusion, and a Transformer baseline.

Both take a LongTensor of token ids (B, L) with 0 as padding, derive the validity
mask from it, and share the embedding, the masked mean pooling and the head, so
they differ only in how tokens mix:

- ``DiffusionText``: T iterations of
  ``h <- LayerNorm(alpha * h + (1 - alpha) * MLP(sum_o W_o h_{i+o}))`` over the
  offsets o = -w..w (w = 1 is the seed's left, self and right). The projections and
  the MLP are shared by the T iterations, as in the seed. Unlike the seed's circular
  shifts, a neighbour beyond the sequence or at padding contributes zero, so a
  sequence's logits do not depend on how much padding its batch adds.
- ``TransformerText``: ``torch.nn.TransformerEncoder`` (pre-norm, GELU; its
  attention runs through scaled_dot_product_attention), learned positions, a key
  padding mask.

Letters: B batch, L tokens, D width, O = 2w + 1 offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from afmp.data.text import PAD_ID
from afmp.layers import ClassifierMixin, init_linear_weights, make_head, masked_mean
from afmp.registry import check_positive_ints, register_model


# -- shared pieces ------------------------------------------------------------------------
def check_tokens(x: torch.Tensor, vocab_size: int) -> None:
    """Raise a ValueError that says what was expected if ``x`` is not a (B, L) batch of token ids."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype.is_floating_point or x.dtype == torch.bool:
        what = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected token ids of shape (B, L) and an integer dtype (0 = padding), got {what}")
    # A data-dependent check: skipped while compiling so that it causes no graph break.
    if not torch.compiler.is_compiling() and x.numel():
        lo, hi = (int(v) for v in torch.aminmax(x))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"expected token ids in [0, {vocab_size}), got values in [{lo}, {hi}]")


class TextClassifier(ClassifierMixin, nn.Module):
    """Token embedding, masked mean pooling and a two-layer head; subclasses define the mixing.

    A subclass's ``forward_features(x, return_aux)`` returns the (B, L, D) states and
    ``aux`` with the validity mask; ``forward_head`` pools them over that mask.
    """

    def _build_shared(self, cfg) -> None:
        self.cfg = cfg
        self.num_features = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=PAD_ID)
        # The seed's (and DistilBERT's) head: Linear, GELU, dropout, then the classifier.
        self.pre_logits = nn.Sequential(
            nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.GELU(), nn.Dropout(cfg.dropout)
        )
        self.global_pool = self.POOL
        self.head = make_head(cfg.embed_dim, cfg.num_classes)

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_tokens(x, self.cfg.vocab_size)
        return self.embed(x), x != PAD_ID

    def forward_head(
        self, features: torch.Tensor, pre_logits: bool = False, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pool over the valid tokens and classify. ``mask`` (B, L), True where a token is
        real (``x != PAD_ID``), as timm's variable-length ViT takes ``patch_valid``: without
        it every position counts, padding included."""
        pooled = self.pre_logits(masked_mean(features, mask) if self.global_pool else features)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        features, aux = self.forward_features(x, return_aux=True)
        logits = self.forward_head(features, mask=aux["mask"])
        return (logits, aux) if return_aux else logits

    def example_input(self, batch_size: int = 2, size: int | None = None) -> torch.Tensor:
        """Random token ids (B, size), no padding; ``size`` is the sequence length (default 64)."""
        size = size or min(64, self.cfg.max_len)
        return torch.randint(1, self.cfg.vocab_size, (batch_size, size), device=self.embed.weight.device)


def _check_positive(cfg, names) -> None:
    check_positive_ints(cfg, *(n for n in names if n != "num_classes"))
    check_positive_ints(cfg, "num_classes", minimum=0)  # 0: no classifier, features out
    if cfg.vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 (id 0 is padding), got {cfg.vocab_size}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")


# -- attention-free diffusion -------------------------------------------------------------
def shift(x: torch.Tensor, offset: int) -> torch.Tensor:
    """y[:, i] = x[:, i + offset] along dim 1, zero where i + offset falls outside [0, L)."""
    L = x.shape[1]
    if offset == 0:
        return x
    if abs(offset) >= L:
        return torch.zeros_like(x)
    if offset > 0:
        return F.pad(x[:, offset:], (0, 0, 0, offset))
    return F.pad(x[:, :offset], (0, 0, -offset, 0))


class NeighbourDiffusion(nn.Module):
    """One diffusion step: ``LayerNorm(alpha * h + (1 - alpha) * MLP(sum_o W_o h_{i+o}))``."""

    def __init__(self, *, dim: int, window: int, alpha: float, mlp_ratio: float, dropout: float):
        super().__init__()
        self.window, self.alpha = window, alpha
        # proj[k] acts on the neighbour at offset k - window (proj[window] on the token itself);
        # with window 1 these are the seed's left / self / right projections (no bias, as there).
        self.proj = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(2 * window + 1))
        hidden = int(dim * mlp_ratio)
        self.update = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.norm = nn.LayerNorm(dim)

    def neighbour_sum(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """sum_o W_o h_{i+o}, with padding and positions beyond the sequence contributing zero."""
        # A shift commutes with a bias-free per-token map, so one GEMM projects every offset
        # (B, L, O*D) and the shifts move the projected chunks.
        weight = torch.cat([p.weight for p in self.proj])
        projected = F.linear(h * mask.unsqueeze(-1).to(h.dtype), weight).chunk(len(self.proj), dim=-1)
        out = projected[self.window]
        for k, part in enumerate(projected):
            if k != self.window:
                out = out + shift(part, k - self.window)
        return out

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        update = self.update(self.neighbour_sum(h, mask))
        return self.norm(self.alpha * h + (1 - self.alpha) * update)


class DiffusionText(TextClassifier):
    @dataclass
    class Config:
        vocab_size: int = 257  # byte-level ids + padding
        num_classes: int = 2
        max_len: int = 4096  # longest input the data yields; the model itself has no position table
        embed_dim: int = 256
        num_iters: int = 4  # T
        alpha: float = 0.6  # share of the old state kept by each step
        window: int = 1  # w: each step reads the tokens at offsets -w..w
        noise_std: float = 0.05  # Gaussian noise on the embeddings, training only
        mlp_ratio: float = 2.0
        dropout: float = 0.1

        def __post_init__(self):
            _check_positive(
                self, ("vocab_size", "num_classes", "max_len", "embed_dim", "num_iters", "window")
            )
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
            if self.noise_std < 0:
                raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
            if self.mlp_ratio <= 0:
                raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")

    def __init__(self, cfg: Config):
        super().__init__()
        self._build_shared(cfg)
        self.step = NeighbourDiffusion(
            dim=cfg.embed_dim,
            window=cfg.window,
            alpha=cfg.alpha,
            mlp_ratio=cfg.mlp_ratio,
            dropout=cfg.dropout,
        )
        self.apply(init_linear_weights)

    def forward_features(self, x: torch.Tensor, return_aux: bool = False):
        h, mask = self.embed_tokens(x)
        if self.training and self.cfg.noise_std > 0:
            h = h + self.cfg.noise_std * torch.randn_like(h)
        for _ in range(self.cfg.num_iters):
            h = self.step(h, mask)
        return (h, {"mask": mask}) if return_aux else h


# -- Transformer baseline -----------------------------------------------------------------
class TransformerText(TextClassifier):
    @dataclass
    class Config:
        vocab_size: int = 257
        num_classes: int = 2
        max_len: int = 4096  # size of the learned position table
        embed_dim: int = 256
        num_layers: int = 4
        num_heads: int = 4
        mlp_ratio: float = 2.0
        dropout: float = 0.1

        def __post_init__(self):
            _check_positive(
                self, ("vocab_size", "num_classes", "max_len", "embed_dim", "num_layers", "num_heads")
            )
            if self.embed_dim % self.num_heads:
                raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
            if self.mlp_ratio <= 0:
                raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")

    def __init__(self, cfg: Config):
        super().__init__()
        self._build_shared(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_len, cfg.embed_dim))
        layer = nn.TransformerEncoderLayer(
            cfg.embed_dim,
            cfg.num_heads,
            dim_feedforward=int(cfg.embed_dim * cfg.mlp_ratio),
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors do not apply to pre-norm layers; saying so up front silences the warning.
        self.encoder = nn.TransformerEncoder(
            layer, cfg.num_layers, norm=nn.LayerNorm(cfg.embed_dim), enable_nested_tensor=False
        )
        self.apply(init_linear_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward_features(self, x: torch.Tensor, return_aux: bool = False):
        h, mask = self.embed_tokens(x)
        if x.shape[1] > self.cfg.max_len:
            raise ValueError(
                f"sequence length {x.shape[1]} exceeds max_len {self.cfg.max_len} (the position table); "
                f"create the model with max_len={x.shape[1]} or truncate the input"
            )
        h = h + self.pos_embed[:, : x.shape[1]]
        # A sequence with no valid token would attend to nothing (NaN); let it attend to its padding.
        ignore = ~mask & mask.any(1, keepdim=True)
        h = self.encoder(h, src_key_padding_mask=ignore)
        return (h, {"mask": mask}) if return_aux else h

    def example_input(self, batch_size: int = 2, size: int | None = None) -> torch.Tensor:
        if size is not None and size > self.cfg.max_len:
            raise ValueError(
                f"size {size} exceeds max_len {self.cfg.max_len}; create the model with max_len={size}"
            )
        return super().example_input(batch_size, size)


# Seed defaults: width 256, T = 4, alpha 0.6 (the seed's README gives 0.5-0.7).
register_model("diffusion_text", DiffusionText, embed_dim=256, num_iters=4, alpha=0.6, window=1)
# Matched to diffusion_text: same width and MLP ratio, one layer per diffusion iteration.
register_model(
    "transformer_text_matched", TransformerText, embed_dim=256, num_layers=4, num_heads=4, mlp_ratio=2.0
)
# DistilBERT's size (the seed's AG News baseline): 6 layers, 768 wide, 12 heads, 3072 MLP.
register_model(
    "transformer_text_distilbert", TransformerText, embed_dim=768, num_layers=6, num_heads=12, mlp_ratio=4.0
)
