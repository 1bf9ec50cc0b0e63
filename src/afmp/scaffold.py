"""Static communication scaffolds as padded neighbour lists.

A scaffold is a graph over token positions, built once per layout and cached by
the layout's parameters. Every edge exists in both directions. It is stored
pull-style, one row per token::

    neighbors (N, K) long   j for each slot of token i (padding slots point at i itself)
    mask      (N, K) bool   True for a real edge i <- j
    length    (N, K) float  |pos_i - pos_j| (0 in padding slots)
    reverse   (N, K) long   the slot of i in j's own list (so the edge i -> j), for
                            kernels that push gradients back along reversed edges
    slots     (E,)   long   flat index i*K + s of every real edge's slot, in order, for
                            the packed backend that skips padding (E = num_edges)

The same lists serve every image of a batch: nothing (B*N)-sized is ever built.
Neighbours of a token are sorted by index, so the layout is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class Scaffold:
    neighbors: torch.Tensor
    mask: torch.Tensor
    length: torch.Tensor
    reverse: torch.Tensor
    slots: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.neighbors.shape[0]

    @property
    def max_degree(self) -> int:
        return self.neighbors.shape[1]

    @property
    def num_edges(self) -> int:
        """Directed edges (each undirected edge counts twice)."""
        return self.slots.numel()

    def to(self, device) -> Scaffold:
        return Scaffold(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def from_edges(edges: np.ndarray, positions: np.ndarray) -> Scaffold:
    """Padded lists from undirected edges (E, 2) over ``positions`` (N, d)."""
    n = positions.shape[0]
    adjacency: list[set[int]] = [set() for _ in range(n)]
    for a, b in np.asarray(edges, dtype=np.int64).reshape(-1, 2):
        if a == b:
            continue
        adjacency[a].add(int(b))
        adjacency[b].add(int(a))
    k = max(1, max(len(s) for s in adjacency))
    neighbors = np.tile(np.arange(n)[:, None], (1, k))
    mask = np.zeros((n, k), dtype=bool)
    for i, nbrs in enumerate(adjacency):
        row = sorted(nbrs)
        neighbors[i, : len(row)] = row
        mask[i, : len(row)] = True
    length = np.linalg.norm(positions[neighbors] - positions[:, None, :], axis=-1) * mask
    slot = {(i, int(j)): s for i in range(n) for s, j in enumerate(neighbors[i]) if mask[i, s]}
    reverse = np.zeros((n, k), dtype=np.int64)
    for i in range(n):
        for s in range(k):
            if mask[i, s]:
                reverse[i, s] = slot[(int(neighbors[i, s]), i)]
    return Scaffold(
        neighbors=torch.from_numpy(neighbors).long(),
        mask=torch.from_numpy(mask),
        length=torch.from_numpy(length).float(),
        reverse=torch.from_numpy(reverse).long(),
        slots=torch.from_numpy(np.flatnonzero(mask)).long(),
    )


def delaunay(positions: np.ndarray) -> Scaffold:
    """Delaunay triangulation of 2-D ``positions`` (N, 2); collinear points become a chain."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"delaunay expects positions of shape (N, 2), got {positions.shape}")
    n = positions.shape[0]
    if n < 2:
        return from_edges(np.zeros((0, 2)), positions)
    centred = positions - positions.mean(0)
    if n < 3 or np.linalg.matrix_rank(centred, tol=1e-9) < 2:
        # Qhull cannot triangulate points on a line: link each to its successor along it.
        order = np.argsort(centred @ np.linalg.svd(centred)[2][0], kind="stable")
        return from_edges(np.stack([order[:-1], order[1:]], 1), positions)
    from scipy.spatial import Delaunay

    simplices = Delaunay(positions).simplices
    edges = np.concatenate([simplices[:, [0, 1]], simplices[:, [1, 2]], simplices[:, [0, 2]]])
    return from_edges(edges, positions)


def grid_positions(height: int, width: int) -> np.ndarray:
    """(row, col) of each token of a height x width grid, row-major, in grid units."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], 1).astype(np.float64)


@lru_cache(maxsize=64)
def delaunay_grid(height: int, width: int) -> Scaffold:
    """Delaunay scaffold of a token grid (lengths in grid units, so resolution-free)."""
    _check_positive(height=height, width=width)
    return delaunay(grid_positions(height, width))


@lru_cache(maxsize=64)
def window(length: int, radius: int) -> Scaffold:
    """1-D scaffold: token i linked to the ``radius`` tokens on each side (clipped at the ends)."""
    _check_positive(length=length, radius=radius)
    edges = [(i, j) for i in range(length) for j in range(i + 1, min(length, i + radius + 1))]
    positions = np.arange(length, dtype=np.float64)[:, None]
    return from_edges(np.array(edges, dtype=np.int64).reshape(-1, 2), positions)


LAYOUTS = {"delaunay": delaunay_grid}


def build(layout: str, height: int, width: int) -> Scaffold:
    """Scaffold of a ``layout`` over a height x width token grid."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown scaffold layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout](height, width)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
