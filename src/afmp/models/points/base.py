"""What every point-set model shares: the batch it takes and timm's classifier interface on it.

A point-set model takes the batch dict of afmp.data.points (``collate_point_sets``), pools
its valid tokens and classifies; it sets ``embed`` (its first layer), ``norm`` (the
readout's norm, or Identity) and ``head``, and writes ``forward_features``.
"""

from __future__ import annotations

import torch

from afmp.layers import ClassifierMixin, masked_mean
from afmp.utils.runtime import to_device

BATCH_KEYS = ("features", "positions", "neighbors", "mask", "length", "valid")


def check_point_batch(x, in_features: int, pos_dim: int) -> None:
    """A clear error for anything but the batch dict of afmp.data.points."""
    if not isinstance(x, dict) or set(BATCH_KEYS) - set(x):
        got = sorted(x) if isinstance(x, dict) else type(x).__name__
        raise ValueError(f"a point-set model takes a dict with {', '.join(BATCH_KEYS)}; got {got}")
    b, n = x["valid"].shape
    expected = {
        "features": (b, n, in_features),
        "positions": (b, n, pos_dim),
        "neighbors": (b, n, x["neighbors"].shape[-1]),
        "mask": x["neighbors"].shape,
        "length": x["neighbors"].shape,
    }
    for key, shape in expected.items():
        if tuple(x[key].shape) != tuple(shape):
            raise ValueError(f"point batch {key!r} has shape {tuple(x[key].shape)}, expected {tuple(shape)}")
    if not torch.compiler.is_compiling():  # a data-dependent check: eager only
        empty = (~x["valid"].any(1)).nonzero()
        if len(empty):
            raise ValueError(f"example {int(empty[0])} of the point batch marks no token valid")


class PointSetClassifier(ClassifierMixin):
    first_conv = "embed"

    def forward_head(
        self, features: torch.Tensor, pre_logits: bool = False, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pool over the valid tokens (``valid`` (B, N); without it every token counts) and classify."""
        pooled = self.norm(masked_mean(features, valid) if self.global_pool else features)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: dict, return_aux: bool = False):
        features, aux = self.forward_features(x, return_aux=True)
        logits = self.forward_head(features, valid=aux["valid"])
        return (logits, aux) if return_aux else logits

    def example_input(self, batch_size: int = 2, size: int | None = None) -> dict:
        """A random batch of point sets of ``size`` points each (as timm's example inputs, no
        padding: ``forward_head`` without ``valid`` then pools what ``forward`` pools)."""
        from afmp.data.points import example_point_batch

        x = example_point_batch(batch_size, self.cfg.in_features, self.cfg.pos_dim, num_points=size or 12)
        return to_device(x, next(self.parameters()).device)
