"""Blocks shared by the models: the classifier interface, patch embedding, input checks."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn


def make_head(num_features: int, num_classes: int) -> nn.Module:
    """The classifier: linear, or (``num_classes=0``, as in timm) none, so the model returns features."""
    return nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()


class ClassifierMixin:
    """timm's classifier interface, for a model whose classifier is ``self.head`` on
    ``num_features`` pooled features. ``global_pool`` is how the model pools its tokens
    (``POOL``, e.g. "avg" or "token"); "" leaves them unpooled, so that ``forward_head``
    with ``pre_logits`` (or no classifier) returns every token's features."""

    POOL = "avg"

    @property
    def head_hidden_size(self) -> int:
        return self.num_features

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """Logits; with ``return_aux``, also the ``aux`` dict of ``forward_features`` (extra
        losses under ``aux["losses"]``, and what afmp.commands.viz reads)."""
        if return_aux:
            features, aux = self.forward_features(x, return_aux=True)
            return self.forward_head(features), aux
        return self.forward_head(self.forward_features(x))

    def example_input(self, batch_size: int = 2, size: int | None = None) -> torch.Tensor:
        """A random image batch of the shape this model takes (``size``: image side; default
        the config's ``img_size``). Sequence models override it."""
        size = size or self.cfg.img_size
        return torch.randn(batch_size, self.cfg.in_chans, size, size, device=next(self.parameters()).device)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        if global_pool is not None:
            if global_pool not in ("", self.POOL):
                raise ValueError(f"global_pool must be {self.POOL!r} or '' (no pooling), got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = self.cfg.num_classes = num_classes
        old = next(self.parameters())
        self.head = make_head(self.num_features, num_classes).to(device=old.device, dtype=old.dtype)


def init_linear_weights(module: nn.Module) -> None:
    """timm's ViT initialisation, for ``model.apply``: truncated-normal linear weights (std
    0.02), zero biases; other layers keep PyTorch's defaults."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def check_image_batch(x: torch.Tensor, in_chans: int, patch_size: int) -> None:
    """Raise a ValueError that says what was expected if ``x`` is not a usable image batch."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected an image batch of shape (B, {in_chans}, H, W), got {shape}")
    if x.shape[0] == 0:  # means over no images are NaN (the sparsity loss among them)
        raise ValueError(f"expected at least one image, got an empty batch of shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channel(s), got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    h, w = x.shape[-2:]
    if h % patch_size or w % patch_size or h == 0 or w == 0:
        raise ValueError(f"expected height and width divisible by the patch size {patch_size}, got {h}x{w}")
    # A data-dependent check, skipped while compiling (no graph break) or capturing a CUDA
    # graph (no sync). x * 0 is 0 exactly where x is finite and NaN elsewhere, so its sum is 0
    # exactly when every element is finite: two ops, where isfinite().all() dispatches ten.
    if not _tracing(x) and float((x * 0).sum()) != 0:
        raise ValueError("expected finite input; the batch contains NaN or infinity")


def _tracing(x: torch.Tensor) -> bool:
    """Whether ``x`` flows through code being compiled or captured, where reading a value back fails."""
    if torch.compiler.is_compiling():
        return True
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches, each mapped linearly to ``dim`` (a strided conv)."""

    def __init__(self, *, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, D, gh, gw)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


def grid_centres(height: int, width: int, device=None) -> torch.Tensor:
    """Patch centres of a height x width token grid, normalised to [0, 1], row-major (N, 2)."""
    rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    cols = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)


def masked_mean(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the valid tokens of each sequence or set (B, L, D) -> (B, D); one with none gives 0."""
    if mask is None:
        return h.mean(1)
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)
