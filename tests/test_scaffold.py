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


def test_lists_from_edges_are_literal_rows_sorted_with_padding():
    # Repeats, both directions, a self-loop and a token with no edge (3): one row each.
    edges = np.array([[2, 0], [0, 1], [1, 0], [3, 3], [2, 1], [0, 2], [4, 1]])
    positions = np.array([[0, 0], [3, 0], [0, 4], [9, 9], [3, 1]], dtype=float)
    sc = scaffold.from_edges(edges, positions)
    assert sc.neighbors.tolist() == [[1, 2, 0], [0, 2, 4], [0, 1, 2], [3, 3, 3], [1, 4, 4]]
    assert sc.mask.tolist() == [
        [True, True, False],
        [True, True, True],
        [True, True, False],
        [False, False, False],
        [True, False, False],
    ]
    assert sc.slots.tolist() == [0, 1, 3, 4, 5, 6, 7, 12]
    assert sc.length.tolist() == [[3, 4, 0], [3, 5, 1], [4, 5, 0], [0, 0, 0], [1, 0, 0]]
    # No edge at all: one padding slot per token.
    lone = scaffold.from_edges(np.zeros((0, 2), dtype=np.int64), positions[:2])
    assert lone.neighbors.tolist() == [[0], [1]] and not lone.mask.any() and lone.num_edges == 0


def loop_lists(edges, n):
    """The padded lists built edge by edge, as from_edges did before it was vectorised."""
    adjacency = [set() for _ in range(n)]
    for a, b in edges:
        if a != b:
            adjacency[a].add(int(b))
            adjacency[b].add(int(a))
    k = max(1, max(len(s) for s in adjacency))
    neighbors, mask = np.tile(np.arange(n)[:, None], (1, k)), np.zeros((n, k), dtype=bool)
    for i, row in enumerate(adjacency):
        neighbors[i, : len(row)], mask[i, : len(row)] = sorted(row), True
    return neighbors, mask


@pytest.mark.parametrize("seed", range(5))
def test_lists_from_edges_match_the_edge_by_edge_loop_on_random_graphs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    edges = rng.integers(0, n, size=(int(rng.integers(0, 4 * n)), 2))
    positions = rng.normal(size=(n, 3))
    sc = scaffold.from_edges(edges, positions)
    neighbors, mask = loop_lists(edges, n)
    np.testing.assert_array_equal(sc.neighbors.numpy(), neighbors)
    np.testing.assert_array_equal(sc.mask.numpy(), mask)
    np.testing.assert_allclose(
        sc.length.numpy(),
        np.linalg.norm(positions[neighbors] - positions[:, None], axis=-1) * mask,
        rtol=1e-6,
    )


def test_window_layout_at_the_sequence_ends():
    sc = scaffold.window(5, 2)
    assert neighbour_sets(sc) == [[1, 2], [0, 2, 3], [0, 1, 3, 4], [1, 2, 4], [2, 3]]
    # Slot s is offset s of (0, -2), (0, -1), (0, 1), (0, 2); off the ends: padding.
    assert sc.neighbors[0].tolist() == [0, 0, 1, 2] and sc.mask[0].tolist() == [False, False, True, True]
    assert sc.length[0].tolist() == [0.0, 0.0, 1.0, 2.0]
    assert sc.num_edges == 14


def test_uniform_delaunay_grid_has_literal_neighbours():
    sc = scaffold.delaunay_grid(3, 3)
    assert sc.stencil.offsets == ((-1, -1), (-1, 0), (0, -1), (0, 1), (1, 0), (1, 1))
    assert neighbour_sets(sc) == [
        [1, 3, 4],
        [0, 2, 4, 5],
        [1, 5],
        [0, 4, 6, 7],
        [0, 1, 3, 5, 7, 8],
        [1, 2, 4, 8],
        [3, 7],
        [3, 4, 6, 8],
        [4, 5, 7],
    ]
    # Token 2 (row 0, column 2): slot s holds offset s, padding where it leaves the grid.
    assert sc.neighbors[2].tolist() == [2, 2, 1, 2, 5, 2]
    assert sc.mask[2].tolist() == [False, False, True, False, True, False]
    assert sc.length[4].tolist() == pytest.approx([2**0.5, 1, 1, 1, 1, 2**0.5])


def test_uniform_delaunay_grid_is_a_delaunay_triangulation():
    """No grid point lies strictly inside the circumcircle of any triangle (exact integers)."""
    height, width = 4, 5
    sets = neighbour_sets(scaffold.delaunay_grid(height, width))
    pos = scaffold.grid_positions(height, width).astype(int)
    triangles = {
        tuple(sorted((i, j, k))) for i in range(len(sets)) for j in sets[i] for k in sets[j] if k in sets[i]
    }
    assert len(triangles) == 2 * (height - 1) * (width - 1)
    for tri in triangles:
        (ax, ay), (bx, by), (cx, cy) = (pos[v] for v in tri)
        orient = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
        for dx, dy in pos:
            rows = [(px - dx, py - dy) for px, py in ((ax, ay), (bx, by), (cx, cy))]
            (a1, a2), (b1, b2), (c1, c2) = rows
            det = (
                (a1 * a1 + a2 * a2) * (b1 * c2 - b2 * c1)
                - (b1 * b1 + b2 * b2) * (a1 * c2 - a2 * c1)
                + (c1 * c1 + c2 * c2) * (a1 * b2 - a2 * b1)
            )
            assert det * orient <= 0, f"grid point {(dx, dy)} inside the circumcircle of {tri}"


def test_qhull_grid_keeps_scipys_edges_as_a_masked_stencil():
    sc = scaffold.delaunay_qhull_grid(5, 7)
    assert sc.stencil.offsets == scaffold.window_offsets(1) and sc.max_degree == 8
    assert neighbour_sets(sc) == neighbour_sets(scaffold.delaunay(scaffold.grid_positions(5, 7)))
    # Qhull mixes the diagonals, so some interior slots are masked although on the grid.
    interior = sc.mask.view(5, 7, 8)[1:-1, 1:-1]
    assert 0 < int((~interior).sum()) < interior.numel()


def test_window_grid_layout():
    sc = scaffold.window_grid(3, 3, 1)
    assert neighbour_sets(sc)[4] == [0, 1, 2, 3, 5, 6, 7, 8]
    assert neighbour_sets(sc)[0] == [1, 3, 4]
    assert scaffold.window_grid(5, 6, 2).max_degree == 24
    assert neighbour_sets(scaffold.window_grid(1, 5, 2)) == neighbour_sets(scaffold.window(5, 2))


def test_stencil_rejects_one_way_offsets_and_edges():
    with pytest.raises(ValueError, match="pairs"):
        scaffold.stencil(3, 3, ((0, 1),))
    exists = np.ones((3, 3, 2), dtype=bool)
    exists[1, 1, 0] = False  # (1, 1) -> (1, 0) gone, (1, 0) -> (1, 1) still there
    with pytest.raises(ValueError, match="both directions"):
        scaffold.stencil(3, 3, ((0, -1), (0, 1)), exists)


@pytest.mark.parametrize(
    "sc",
    [
        scaffold.delaunay_grid(5, 7),
        scaffold.delaunay_qhull_grid(5, 7),
        scaffold.window_grid(4, 5, 2),
        scaffold.window(9, 3),
        scaffold.delaunay_grid(1, 6),
    ],
)
def test_every_edge_exists_in_both_directions(sc):
    sets = neighbour_sets(sc)
    for i, nbrs in enumerate(sets):
        for j in nbrs:
            assert i in sets[j]
    # Slot s of every token holds its neighbour at offset s, at that offset's length.
    st = sc.stencil
    for i in range(sc.num_tokens):
        for k in range(sc.max_degree):
            if sc.mask[i, k]:
                (y, x), (dy, dx) = divmod(i, st.width), st.offsets[k]
                assert int(sc.neighbors[i, k]) == (y + dy) * st.width + x + dx
                assert sc.length[i, k] == st.lengths[k] == pytest.approx((dy * dy + dx * dx) ** 0.5)


def test_grid_scaffold_is_cached_and_deterministic():
    assert scaffold.delaunay_grid(4, 4) is scaffold.delaunay_grid(4, 4)
    fresh = scaffold.stencil(4, 4, scaffold.UNIFORM_DELAUNAY_OFFSETS)
    assert torch.equal(fresh.neighbors, scaffold.delaunay_grid(4, 4).neighbors)
    # Lengths are in grid units: 1 along rows and columns, sqrt(2) on a diagonal.
    lengths = scaffold.delaunay_grid(4, 4).length[scaffold.delaunay_grid(4, 4).mask]
    near_one, near_diag = (lengths - 1).abs() < 1e-6, (lengths - 2**0.5).abs() < 1e-6
    assert bool((near_one | near_diag).all()) and int(near_diag.sum()) > 0


@pytest.mark.parametrize("build", [scaffold.delaunay_grid, scaffold.delaunay_qhull_grid])
def test_collinear_tokens_become_a_chain(build):
    assert neighbour_sets(build(1, 4)) == [[1], [0, 2], [1, 3], [2]]
    assert neighbour_sets(build(4, 1)) == [[1], [0, 2], [1, 3], [2]]


def test_bad_layout_parameters_raise():
    with pytest.raises(ValueError, match="unknown scaffold layout"):
        scaffold.build("knn", 4, 4)
    with pytest.raises(ValueError, match="radius must be a positive integer"):
        scaffold.build("window", 4, 4, radius=0)
    with pytest.raises(ValueError, match="positive integer"):
        scaffold.window(0, 2)
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        scaffold.delaunay(np.zeros((4, 3)))
