"""Point sets: one scaffold per example, and the padded batch the point-set models take.

An example is a dict of numpy arrays:

    features   (N, C) float32   what each token carries (e.g. mean intensity and centroid)
    positions  (N, d) float32   where it is, d = 2 or 3, in the frame the model embeds
    neighbors  (N, K) int64     the scaffold's padded lists, local indices (padding: i itself)
    mask       (N, K) bool      True for a real edge i <- j
    length     (N, K) float32   |pos_i - pos_j| in units of the example's mean nearest-
                                neighbour distance (0 in padding slots)

Lengths are real distances, divided by a unit of the example's own: so the same shape
at any scale has the same lengths, and on a regular grid the unit is the grid spacing,
which makes a grid given as points the grid model's scaffold exactly
(tests/test_point_sets.py).

A batch (``collate_point_sets``) is a dict of tensors padded to the batch's largest N and
K: the same five, and ``valid`` (B, N) bool. Padding tokens have no edges, so they send
and receive nothing; the models pool over valid tokens only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from afmp import scaffold as scaffolds

GRAPHS = ("delaunay", "knn")
KEYS = ("features", "positions", "neighbors", "mask", "length")


def point_graph(positions: np.ndarray, graph: str = "delaunay", k: int = 8) -> dict[str, np.ndarray]:
    """The scaffold of one example's ``positions`` (N, d): neighbors, mask, length (see above)."""
    positions = np.asarray(positions, dtype=np.float64)
    unit = check_positions(positions).mean()  # the length unit: mean nearest-neighbour distance
    if graph == "delaunay":
        edges = scaffolds.delaunay_edges(positions)
    elif graph == "knn":
        edges = scaffolds.knn_edges(positions, k)
    else:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    sc = scaffolds.from_edges(edges, positions)
    mask = sc.mask.numpy()
    length = sc.length.double().numpy()
    return {
        "neighbors": sc.neighbors.numpy().astype(np.int64),
        "mask": mask,
        "length": (length / unit) * mask,
    }


def check_positions(positions: np.ndarray) -> np.ndarray:
    """A one-line ValueError for positions no scaffold can be built on; else each point's
    distance to its nearest other point (found on the way)."""
    if positions.ndim != 2 or positions.shape[1] not in (2, 3):
        raise ValueError(f"positions must be (N, 2) or (N, 3), got shape {positions.shape}")
    if positions.shape[0] < 3:
        raise ValueError(f"a point set needs at least 3 points for a scaffold, got {positions.shape[0]}")
    if not np.isfinite(positions).all():
        row = int(np.flatnonzero(~np.isfinite(positions).all(1))[0])
        raise ValueError(f"position {row} is not finite: {positions[row].tolist()}")
    distance, index = nearest(positions)
    if (distance == 0).any():
        row = int(np.flatnonzero(distance == 0)[0])
        raise ValueError(f"points {row} and {int(index[row])} share the position {positions[row].tolist()}")
    return distance


def nearest(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each point's distance to its nearest other point, and that point (a k-d tree: N log N)."""
    from scipy.spatial import cKDTree

    distance, index = cKDTree(positions).query(positions, k=2)
    # Where two points coincide, either may come first: the other one is the neighbour.
    own = index[:, 0] == np.arange(len(positions))
    return distance[:, 1], np.where(own, index[:, 1], index[:, 0])


class PointSets(Dataset):
    """Examples (dicts of ``KEYS``) and their labels, held in memory."""

    def __init__(self, examples: list[dict[str, np.ndarray]], labels: np.ndarray):
        if len(examples) != len(labels):
            raise ValueError(f"{len(examples)} examples but {len(labels)} labels")
        self.examples = examples
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i], self.labels[i]


def collate_point_sets(batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """[(example, label), ...] -> (the padded batch dict, labels (B,))."""
    examples, labels = zip(*batch)
    n = max(e["features"].shape[0] for e in examples)
    k = max(e["neighbors"].shape[1] for e in examples)
    size, first = len(examples), {key: torch.as_tensor(v) for key, v in examples[0].items()}
    out = {
        # In the examples' own dtypes (float32 from the data sets; float64 where a test asks).
        "features": first["features"].new_zeros(size, n, first["features"].shape[1]),
        "positions": first["positions"].new_zeros(size, n, first["positions"].shape[1]),
        # Padding slots and padding tokens point at themselves, as a scaffold's padding does.
        "neighbors": torch.arange(n).view(1, n, 1).repeat(size, 1, k),
        "mask": torch.zeros(size, n, k, dtype=torch.bool),
        "length": first["length"].new_zeros(size, n, k),
        "valid": torch.zeros(size, n, dtype=torch.bool),
    }
    for b, e in enumerate(examples):
        m = e["neighbors"].shape[0]
        for key in KEYS:  # each into its top-left corner: fewer tokens, fewer slots
            out[key][b, :m, : e[key].shape[1]] = torch.as_tensor(e[key])
        out["valid"][b, :m] = True
    return out, torch.stack([torch.as_tensor(y, dtype=torch.long) for y in labels])


def example_point_batch(
    batch_size: int,
    in_features: int,
    pos_dim: int,
    *,
    num_points: int = 12,
    ragged: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random batch of ``num_points`` points per set: what a point-set model's
    ``example_input`` returns. With ``ragged`` the last set has 3 fewer, so there is padding."""
    gen = np.random.default_rng(seed)
    examples = []
    for b in range(batch_size):
        n = num_points - (3 if ragged and b == batch_size - 1 and batch_size > 1 else 0)
        positions = gen.random((n, pos_dim)).astype(np.float32)
        features = gen.standard_normal((n, in_features)).astype(np.float32)
        examples.append({"features": features, "positions": positions, **point_graph(positions)})
    return collate_point_sets([(e, 0) for e in examples])[0]
