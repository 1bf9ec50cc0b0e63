"""AFMP on point sets: the grid model's layers, on a scaffold of each example's own.

Everything per token is the grid model's (afmp.models.afmp): the same ``RouterPCULayer``,
the same bottom-up and top-down passes (``run_levels``), the same readout. What differs:

- tokens are a set's ``features`` (B, N, C) through a linear embedding, not image patches;
- the scaffold comes with the batch (afmp.data.points builds it per example, in the data
  pipeline); its (B, N, K) local neighbour lists become rows of the flattened (B*N, D)
  batch, which the ``reference`` and ``gather`` backends gather from directly;
- top-k keeps ``E_b - round(sparsity * E_b)`` edges of each example's own E_b;
- the readout and the sparsity loss count valid tokens and real edges only.

Positions are embedded linearly, as the grid model embeds its patch centres (both in
[0, 1] for images). ``position_frame="bbox"`` maps each example's bounding box onto
[0, 1] first (its largest side), for point sets in arbitrary units; edge lengths are
scale-free already (afmp.data.points). A grid given as points computes exactly what
the grid model computes (tests/test_point_sets.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from afmp.layers import make_head
from afmp.models.afmp import afmp_stack, mean_gate, run_levels
from afmp.models.points.base import PointSetClassifier, check_point_batch
from afmp.ops import select_edge_backend
from afmp.registry import check_one_of, check_positive_ints, register_model

POSITION_FRAMES = ("given", "bbox")


@dataclass(frozen=True)
class SetScaffold:
    """One scaffold per example, batched: what the edge backends read of a scaffold."""

    neighbors: torch.Tensor  # (B, N, K) rows of the flattened (B*N, ...) batch
    mask: torch.Tensor  # (B, N, K) bool
    length: torch.Tensor  # (B, N, K)
    num_edges: torch.Tensor  # (B,) real edges of each example
    stencil: None = None  # no grid: the stencil and Triton backends do not apply

    @property
    def num_tokens(self) -> int:
        return self.neighbors.shape[1]

    @property
    def max_degree(self) -> int:
        return self.neighbors.shape[2]


def bbox_frame(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each example's valid positions mapped so that its bounding box's largest side is [0, 1]."""
    big = torch.finfo(positions.dtype).max
    v = valid.unsqueeze(-1)
    low = positions.masked_fill(~v, big).amin(1, keepdim=True)
    high = positions.masked_fill(~v, -big).amax(1, keepdim=True)
    side = (high - low).amax(-1, keepdim=True).clamp_min(torch.finfo(positions.dtype).tiny)
    return ((positions - low) / side).masked_fill(~v, 0)


class PointAFMP(PointSetClassifier, nn.Module):
    @dataclass
    class Config:
        in_features: int = 3  # per token: e.g. mean intensity and centroid (superpixels)
        pos_dim: int = 2  # 2 or 3
        num_classes: int = 10
        num_layers: int = 4
        d_model: int = 64
        k_dim: int = 32
        score_hidden: int = 32
        sparsity: float = 0.3
        lambda_sparse: float = 1e-4
        use_top_down: bool = True
        readout_norm: bool = True
        position_frame: str = "given"  # or "bbox": see the module's docstring
        backend: str = "auto"  # reference or gather (auto: gather on the CPU, reference on CUDA)

        def __post_init__(self):
            check_positive_ints(self, "in_features", "num_layers", "d_model", "k_dim", "score_hidden")
            check_positive_ints(self, "num_classes", minimum=0)
            if self.pos_dim not in (2, 3):
                raise ValueError(f"pos_dim must be 2 or 3, got {self.pos_dim}")
            if not 0.0 <= self.sparsity < 1.0:
                raise ValueError(f"sparsity is the fraction of edges pruned, in [0, 1); got {self.sparsity}")
            if self.lambda_sparse < 0:
                raise ValueError(f"lambda_sparse must be >= 0, got {self.lambda_sparse}")
            check_one_of(self, "position_frame", POSITION_FRAMES)
            check_one_of(self, "backend", ("auto", "reference", "gather"))

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.num_features = cfg.d_model
        self.num_classes = cfg.num_classes
        self.embed = nn.Linear(cfg.in_features, cfg.d_model)
        self.pos_embed = nn.Linear(cfg.pos_dim, cfg.d_model)
        self.layers, self.top_down, self.norm = afmp_stack(cfg)
        self.global_pool = self.POOL
        self.head = make_head(cfg.d_model, cfg.num_classes)

    def scaffold(self, x: dict) -> SetScaffold:
        b, n, _ = x["neighbors"].shape
        rows = x["neighbors"] + torch.arange(b, device=x["neighbors"].device).view(b, 1, 1) * n
        return SetScaffold(rows, x["mask"], x["length"], x["mask"].flatten(1).sum(1))

    def forward_features(self, x: dict, return_aux: bool = False):
        """Every token's states (B, N, D), padding tokens included; with ``return_aux`` the aux dict."""
        check_point_batch(x, self.cfg.in_features, self.cfg.pos_dim)
        sc = self.scaffold(x)
        device = x["features"].device
        backend = select_edge_backend(self.cfg.backend, device, sc)
        positions = x["positions"]
        if self.cfg.position_frame == "bbox":
            positions = bbox_frame(positions, x["valid"])
        h = self.embed(x["features"]) + self.pos_embed(positions.to(x["features"].dtype))
        levels, gate_means = run_levels(self, h, sc, backend)
        out = levels[0] if self.cfg.use_top_down else levels[-1]
        if not return_aux:
            return out
        sparsity_loss = self.cfg.lambda_sparse * mean_gate(gate_means, sc.num_edges.sum().clamp_min(1))
        aux = {
            "losses": {"sparsity": sparsity_loss},
            "sparsity_loss": sparsity_loss,
            "gates": gate_means,
            "states": levels,
            "valid": x["valid"],
        }
        return out, aux


# About 100k parameters, the budget of the graph-network benchmark's MNIST-superpixels table.
register_model("afmp_points", PointAFMP, in_features=3, pos_dim=2, num_classes=10)
