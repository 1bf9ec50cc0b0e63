"""Models of point sets (tokens at real positions, one scaffold per example): AFMP on sets,
and the graph networks it is measured against. They take the batch dict of
afmp.data.points (``collate_point_sets``)."""

from afmp.models.points import afmp_sets, graph_nets  # noqa: F401  (each registers its presets)

__all__ = ["afmp_sets", "graph_nets"]
