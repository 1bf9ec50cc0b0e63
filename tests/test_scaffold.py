import numpy as np
import pytest
import torch

from afmp import scaffold


def neighbour_sets(sc):
    return [sorted(int(j) for j, ok in zip(row, m) if ok) for row, m in zip(sc.neighbors, sc.mask)]


def test_hand_made_layout_has_literal_neighbours():
    # A square with its centre: the diagonals pass through the centre, so they are no edges.
    positions = np.array([[0, 0], [2, 0], [0, 2], [2, 2], [1, 1]], dtype=float)
    sc = scaffold.delaunay(positions)
    assert neighbour_sets(sc) == [[1, 2, 4], [0, 3, 4], [0, 3, 4], [1, 2, 4], [0, 1, 2, 3]]
    assert sc.max_degree == 4 and sc.num_edges == 16
    # Padding slots point at the token itself and are masked out.
    assert sc.neighbors[0].tolist() == [1, 2, 4, 0] and sc.mask[0].tolist() == [True, True, True, False]
    assert sc.length[0].tolist() == pytest.approx([2.0, 2.0, 2**0.5, 0.0])


def test_window_layout_at_the_sequence_ends():
    sc = scaffold.window(5, 2)
    assert neighbour_sets(sc) == [[1, 2], [0, 2, 3], [0, 1, 3, 4], [1, 2, 4], [2, 3]]
    assert sc.length[0, :2].tolist() == [1.0, 2.0]
    assert sc.num_edges == 14


@pytest.mark.parametrize(
    "sc", [scaffold.delaunay_grid(5, 7), scaffold.window(9, 3), scaffold.delaunay_grid(1, 6)]
)
def test_every_edge_exists_in_both_directions_and_reverse_points_back(sc):
    sets = neighbour_sets(sc)
    for i, nbrs in enumerate(sets):
        for j in nbrs:
            assert i in sets[j]
    for i in range(sc.num_tokens):
        for k in range(sc.max_degree):
            if sc.mask[i, k]:
                j = sc.neighbors[i, k]
                assert sc.neighbors[j, sc.reverse[i, k]] == i


def test_grid_scaffold_is_cached_and_deterministic():
    assert scaffold.delaunay_grid(4, 4) is scaffold.delaunay_grid(4, 4)
    fresh = scaffold.delaunay(scaffold.grid_positions(4, 4))
    assert torch.equal(fresh.neighbors, scaffold.delaunay_grid(4, 4).neighbors)
    # Lengths are in grid units: 1 along rows and columns, sqrt(2) on a diagonal.
    lengths = scaffold.delaunay_grid(4, 4).length[scaffold.delaunay_grid(4, 4).mask]
    near_one, near_diag = (lengths - 1).abs() < 1e-6, (lengths - 2**0.5).abs() < 1e-6
    assert bool((near_one | near_diag).all()) and int(near_diag.sum()) > 0


def test_collinear_tokens_become_a_chain():
    assert neighbour_sets(scaffold.delaunay_grid(1, 4)) == [[1], [0, 2], [1, 3], [2]]


def test_bad_layout_parameters_raise():
    with pytest.raises(ValueError, match="unknown scaffold layout"):
        scaffold.build("knn", 4, 4)
    with pytest.raises(ValueError, match="positive integer"):
        scaffold.window(0, 2)
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        scaffold.delaunay(np.zeros((4, 3)))
