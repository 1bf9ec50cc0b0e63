"""Data of tokens at real positions: point sets, each with a scaffold of its own.

An example is a set of N tokens (N varies) with features and positions; its scaffold
(Delaunay or kNN) is built here, in the data pipeline, once per example and cached, never
in a model's forward. ``collate_point_sets`` pads a batch into the dict of tensors the
point-set models (afmp.models.points) take. ``mnist5k-superpixels`` is such a data set.
"""

from afmp.data.points import superpixels  # noqa: F401  (registers mnist5k-superpixels)
from afmp.data.points.sets import (
    GRAPHS,
    PointSets,
    collate_point_sets,
    example_point_batch,
    point_graph,
)

__all__ = ["GRAPHS", "PointSets", "collate_point_sets", "example_point_batch", "point_graph"]
