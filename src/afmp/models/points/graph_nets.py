"""The graph networks AFMP on point sets is measured against: GCN, GAT and GatedGCN
(PyG's ``GCNConv``, ``GATConv``, ``ResGatedGraphConv``; ``pip install "afmp[graph]"``).

They take the same batch as the point-set AFMP (afmp.data.points): the same features,
the same per-example scaffold as their graph, edge lengths as GatedGCN's edge feature.
The shape is the graph-network benchmark's (Dwivedi et al.) at about 100k parameters:
a linear embedding, ``num_layers`` residual blocks ``h + relu(BatchNorm(conv(h)))``,
the mean over each graph's nodes, a linear classifier. BatchNorm sees real nodes only:
the padded (B, N) batch is packed into PyG's one big graph of valid nodes first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from afmp.layers import make_head
from afmp.models.points.base import PointSetClassifier, check_point_batch
from afmp.registry import check_one_of, check_positive_ints, register_model

CONVS = ("gcn", "gat", "gated")


def make_conv(kind: str, hidden: int, heads: int) -> nn.Module:
    try:
        from torch_geometric.nn import GATConv, GCNConv, ResGatedGraphConv
    except ImportError:
        raise ImportError('the graph-network peers need torch_geometric: pip install "afmp[graph]"') from None
    if kind == "gcn":
        return GCNConv(hidden, hidden)
    if kind == "gat":
        return GATConv(hidden, hidden // heads, heads=heads)
    return ResGatedGraphConv(hidden, hidden, edge_dim=1)


def packed_graph(x: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch as one graph of its valid nodes: (node index of every valid token (V,),
    edge_index (2, E) from neighbour j to token i in that numbering, edge lengths (E, 1))."""
    b, n, k = x["neighbors"].shape
    valid = x["valid"].reshape(-1)
    compact = valid.long().cumsum(0) - 1  # padded row -> node number
    rows = (x["neighbors"] + torch.arange(b, device=valid.device).view(b, 1, 1) * n).reshape(-1)
    token = torch.arange(b * n, device=valid.device).repeat_interleave(k)
    real = x["mask"].reshape(-1)
    edge_index = torch.stack([compact[rows[real]], compact[token[real]]])
    return valid.nonzero().squeeze(1), edge_index, x["length"].reshape(-1, 1)[real]


class GraphNet(PointSetClassifier, nn.Module):
    @dataclass
    class Config:
        in_features: int = 3
        pos_dim: int = 2  # positions are not read: the centroid is among the features, as in the benchmark
        num_classes: int = 10
        conv: str = "gcn"
        hidden: int = 152
        num_layers: int = 4
        heads: int = 8  # GAT's; hidden must be divisible by it

        def __post_init__(self):
            check_positive_ints(self, "in_features", "hidden", "num_layers", "heads")
            check_positive_ints(self, "num_classes", minimum=0)
            check_one_of(self, "conv", CONVS)
            if self.conv == "gat" and self.hidden % self.heads:
                raise ValueError(f"GAT's hidden width {self.hidden} is not divisible by heads {self.heads}")

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.num_features = cfg.hidden
        self.num_classes = cfg.num_classes
        self.embed = nn.Linear(cfg.in_features, cfg.hidden)
        self.convs = nn.ModuleList(make_conv(cfg.conv, cfg.hidden, cfg.heads) for _ in range(cfg.num_layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(cfg.hidden) for _ in range(cfg.num_layers))
        self.norm = nn.Identity()  # the readout pools the last block's output as it is
        self.global_pool = self.POOL
        self.head = make_head(cfg.hidden, cfg.num_classes)

    def forward_features(self, x: dict, return_aux: bool = False):
        """Every token's states (B, N, hidden), zero at padding; with ``return_aux`` the aux dict."""
        check_point_batch(x, self.cfg.in_features, self.cfg.pos_dim)
        nodes, edge_index, lengths = packed_graph(x)
        b, n, _ = x["features"].shape
        h = self.embed(x["features"].reshape(b * n, -1)[nodes])
        for conv, norm in zip(self.convs, self.norms):
            update = (
                conv(h, edge_index, lengths.to(h.dtype)) if self.cfg.conv == "gated" else conv(h, edge_index)
            )
            h = h + F.relu(norm(update))
        out = h.new_zeros(b * n, h.shape[-1]).index_copy(0, nodes, h).view(b, n, -1)
        return (out, {"valid": x["valid"]}) if return_aux else out


# Widths that put each at about 100k parameters with 3 input features and 10 classes.
register_model("graph_gcn", GraphNet, conv="gcn", hidden=152)
register_model("graph_gat", GraphNet, conv="gat", hidden=152, heads=8)
register_model("graph_gatedgcn", GraphNet, conv="gated", hidden=78)
