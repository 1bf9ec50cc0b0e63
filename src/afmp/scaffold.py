"""Static communication scaffolds as padded neighbour lists.

A scaffold is a graph over token positions, built once per layout and cached by
the layout's parameters. Every edge exists in both directions. It is stored
pull-style, one row per token::

    neighbors (N, K) long   j for each slot of token i (padding slots point at i itself)
    mask      (N, K) bool   True for a real edge i <- j
    length    (N, K) float  |pos_i - pos_j| (0 in padding slots)
    slots     (E,)   long   flat index i*K + s of every real edge's slot, in order, for
                            the packed backend that skips padding (E = num_edges)

The same lists serve every image of a batch: nothing (B*N)-sized is ever built.

Patch tokens sit on a regular grid, so the layouts a model uses are **stencils**: slot s
of every token is the same grid offset ``offsets[s] = (dy, dx)``, and ``mask`` says
where that neighbour exists (not past the border; for ``delaunay_qhull``, not across the
diagonal Qhull did not pick). Such a scaffold also carries a ``Stencil`` (grid size,
offsets, their lengths), and the ``stencil`` backend works on shifted views of the grid
instead of the lists (afmp.ops.stencil_edge). A scaffold of arbitrary positions
(``delaunay``) has none; its neighbours are sorted by index.

Layouts of a token grid (``LAYOUTS``, a model's ``scaffold`` option):

    delaunay        a Delaunay triangulation with every cell's diagonal the same way
                    (dy, dx) = (1, 1): 6 offsets, no interior mask
    delaunay_qhull  scipy's (Qhull's) triangulation, whose diagonals vary from cell to
                    cell: 8 offsets with an interior mask (the layout of models
                    saved before ``delaunay`` had 6 offsets)
    window          every offset with max(|dy|, |dx|) <= radius: (2r+1)^2 - 1 offsets
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache

import numpy as np
import torch

Offset = tuple[int, int]


@dataclass(frozen=True)
class Stencil:
    """A scaffold on a height x width token grid whose slot s is grid offset ``offsets[s]``."""

    height: int
    width: int
    offsets: tuple[Offset, ...]
    lengths: tuple[float, ...]  # |offset| in grid units, as Scaffold.length holds it

    @property
    def radius(self) -> int:
        return max(max(abs(dy), abs(dx)) for dy, dx in self.offsets)


@dataclass(frozen=True)
class Scaffold:
    neighbors: torch.Tensor
    mask: torch.Tensor
    length: torch.Tensor
    slots: torch.Tensor
    stencil: Stencil | None = None  # plain Python: compiled code reads it as constants

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
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in values.items() if isinstance(v, torch.Tensor)})


def _scaffold(neighbors: np.ndarray, mask: np.ndarray, length: np.ndarray, layout=None) -> Scaffold:
    return Scaffold(
        neighbors=torch.from_numpy(neighbors).long(),
        mask=torch.from_numpy(mask),
        length=torch.from_numpy(length).float(),
        slots=torch.from_numpy(np.flatnonzero(mask)).long(),
        stencil=layout,
    )


def from_edges(edges: np.ndarray, positions: np.ndarray) -> Scaffold:
    """Padded lists from undirected edges (E, 2) over ``positions`` (N, d), neighbours sorted.

    Repeated edges and self-loops are dropped. No Python loop over edges or tokens (sets of
    200k points go through here): the directed pairs are sorted by (token, neighbour), and
    a pair's slot is its place in that order minus where its token's row starts.
    """
    n = positions.shape[0]
    pairs = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    keys = np.sort(np.concatenate([pairs[:, 0] * n + pairs[:, 1], pairs[:, 1] * n + pairs[:, 0]]))
    keys = keys[np.diff(keys, prepend=-1) != 0]  # each pair once: np.unique took 60x as long (numpy 2.4)
    token, neighbour = np.divmod(keys, n) if n else (keys, keys)
    degree = np.bincount(token, minlength=n)
    slot = np.arange(len(keys)) - (np.cumsum(degree) - degree)[token]
    k = max(1, int(degree.max(initial=0)))
    neighbors = np.tile(np.arange(n)[:, None], (1, k))
    mask = np.zeros((n, k), dtype=bool)
    neighbors[token, slot] = neighbour
    mask[token, slot] = True
    length = np.linalg.norm(positions[neighbors] - positions[:, None, :], axis=-1) * mask
    return _scaffold(neighbors, mask, length)


def stencil(
    height: int, width: int, offsets: tuple[Offset, ...], exists: np.ndarray | None = None
) -> Scaffold:
    """Scaffold of a height x width grid whose slot s is grid offset ``offsets[s]`` for every token.

    ``exists`` (height, width, len(offsets)) bool says which of those edges the layout has
    (default: all that stay on the grid); it must hold each edge in both directions, and
    ``offsets`` must hold -o for every o.
    """
    _check_positive(height=height, width=width)
    offsets = tuple((int(dy), int(dx)) for dy, dx in offsets)
    missing = [o for o in offsets if (-o[0], -o[1]) not in offsets or o == (0, 0)]
    if missing or len(set(offsets)) != len(offsets):
        raise ValueError(f"offsets must be distinct, nonzero and come in pairs o, -o; got {offsets}")
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    dy, dx = np.array(offsets).T  # (K,)
    ny, nx = rows[..., None] + dy, cols[..., None] + dx  # (H, W, K) neighbour coordinates
    on_grid = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
    mask = on_grid if exists is None else on_grid & np.asarray(exists, dtype=bool)
    if exists is not None:  # the reverse edge must exist too
        opposite = [offsets.index((-a, -b)) for a, b in offsets]
        back = np.zeros_like(mask)
        for s, o in enumerate(opposite):
            back[..., s] = np.where(on_grid[..., s], mask[ny[..., s] % height, nx[..., s] % width, o], False)
        if not np.array_equal(mask, back):
            raise ValueError("the stencil's edges must exist in both directions")
    own = (rows * width + cols)[..., None]
    neighbors = np.where(mask, ny * width + nx, own).reshape(height * width, -1)
    lengths = tuple(float(np.float32(np.hypot(*o))) for o in offsets)
    length = (np.array(lengths)[None, None, :] * mask).reshape(height * width, -1)
    layout = Stencil(height, width, offsets, lengths)
    return _scaffold(neighbors, mask.reshape(height * width, -1), length, layout)


def delaunay(positions: np.ndarray) -> Scaffold:
    """Delaunay triangulation of 2-D ``positions`` (N, 2); collinear points become a chain."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"delaunay expects positions of shape (N, 2), got {positions.shape}")
    return from_edges(_delaunay_edges(positions), positions)


def _delaunay_edges(positions: np.ndarray) -> np.ndarray:
    """Undirected edges (E, 2) of scipy's (Qhull's) Delaunay triangulation of 2-D or 3-D
    ``positions``. Points that span fewer dimensions (collinear, coplanar) are triangulated
    in the subspace they span; collinear ones become a chain along their line."""
    n, dim = positions.shape
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    centred = positions - positions.mean(0)
    rank = int(np.linalg.matrix_rank(centred, tol=1e-9))
    if n < 3 or rank < 2:
        # Qhull cannot triangulate points on a line: link each to its successor along it.
        order = np.argsort(centred @ np.linalg.svd(centred)[2][0], kind="stable")
        return np.stack([order[:-1], order[1:]], 1)
    from scipy.spatial import Delaunay

    if rank < dim:  # flat in 3-D: triangulate in the plane's own coordinates
        positions = centred @ np.linalg.svd(centred)[2][:rank].T
    simplices = Delaunay(positions).simplices
    corners = simplices.shape[1]  # 3 in 2-D (triangles), 4 in 3-D (tetrahedra)
    pairs = [(a, b) for a in range(corners) for b in range(a + 1, corners)]
    return np.concatenate([simplices[:, [a, b]] for a, b in pairs])


def delaunay_edges(positions: np.ndarray) -> np.ndarray:
    """Undirected edges (E, 2) of the Delaunay triangulation of ``positions`` (N, 2) or (N, 3)."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] not in (2, 3):
        raise ValueError(f"delaunay expects positions of shape (N, 2) or (N, 3), got {positions.shape}")
    return _delaunay_edges(positions)


def knn_edges(positions: np.ndarray, k: int) -> np.ndarray:
    """Undirected edges (E, 2) of the symmetric k-nearest-neighbour graph: i and j are linked
    when either is among the other's ``k`` nearest (Euclidean)."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2:
        raise ValueError(f"knn expects positions of shape (N, d), got {positions.shape}")
    if k < 1:
        raise ValueError(f"knn needs k >= 1 neighbours, got {k}")
    n = positions.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((0, 2), dtype=np.int64)
    from scipy.spatial import cKDTree

    nearest = cKDTree(positions).query(positions, k=k + 1)[1][:, 1:]  # a k-d tree: N log N, not N^2
    return np.stack([np.repeat(np.arange(n), k), nearest.ravel()], 1)


def grid_positions(height: int, width: int) -> np.ndarray:
    """(row, col) of each token of a height x width grid, row-major, in grid units."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], 1).astype(np.float64)


def window_offsets(radius: int) -> tuple[Offset, ...]:
    """Every offset (dy, dx) with max(|dy|, |dx|) <= radius but (0, 0), in raster order."""
    span = range(-radius, radius + 1)
    return tuple((dy, dx) for dy in span for dx in span if (dy, dx) != (0, 0))


# A token's 6 neighbours when every cell is cut along the same diagonal, (0, 0)-(1, 1).
UNIFORM_DELAUNAY_OFFSETS: tuple[Offset, ...] = ((-1, -1), (-1, 0), (0, -1), (0, 1), (1, 0), (1, 1))


@lru_cache(maxsize=64)
def delaunay_grid(height: int, width: int) -> Scaffold:
    """Delaunay scaffold of a token grid with every diagonal the same way (6 offsets).

    The four corners of a grid cell are cocircular, so either diagonal gives a valid
    Delaunay triangulation; this one is fixed by construction, not by Qhull's choice.
    A 1-wide grid is a chain. Lengths are in grid units (1 or sqrt 2).
    """
    return stencil(height, width, UNIFORM_DELAUNAY_OFFSETS)


@lru_cache(maxsize=64)
def delaunay_qhull_grid(height: int, width: int) -> Scaffold:
    """Qhull's Delaunay triangulation of a token grid, as an 8-offset stencil with a mask.

    Qhull cuts each cell along one of its two diagonals, differently from cell to cell
    (the layout of the models saved before the 6-offset ``delaunay``).
    """
    _check_positive(height=height, width=width)
    offsets = window_offsets(1)
    exists = np.zeros((height, width, len(offsets)), dtype=bool)
    for a, b in _delaunay_edges(grid_positions(height, width)):
        for i, j in ((a, b), (b, a)):
            dy, dx = j // width - i // width, j % width - i % width
            exists[i // width, i % width, offsets.index((dy, dx))] = True
    return stencil(height, width, offsets, exists)


@lru_cache(maxsize=64)
def window_grid(height: int, width: int, radius: int = 1) -> Scaffold:
    """Every token linked to the tokens within ``radius`` rows and columns of it."""
    _check_positive(radius=radius)
    return stencil(height, width, window_offsets(radius))


@lru_cache(maxsize=64)
def window(length: int, radius: int) -> Scaffold:
    """1-D scaffold: token i linked to the ``radius`` tokens on each side (clipped at the ends)."""
    _check_positive(length=length, radius=radius)
    offsets = tuple((0, d) for d in range(-radius, radius + 1) if d)
    return stencil(1, length, offsets)


LAYOUTS = {
    "delaunay": lambda height, width, radius: delaunay_grid(height, width),
    "delaunay_qhull": lambda height, width, radius: delaunay_qhull_grid(height, width),
    "window": window_grid,
}


def build(layout: str, height: int, width: int, radius: int = 1) -> Scaffold:
    """Scaffold of a ``layout`` over a height x width token grid (``radius``: window's)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown scaffold layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout](height, width, radius)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
