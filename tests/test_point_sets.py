"""AFMP on point sets: per-example scaffolds, padding, and the tie to the grid model."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import afmp
from afmp import scaffold as scaffolds
from afmp.data.points import collate_point_sets, example_point_batch, point_graph
from afmp.layers import grid_centres
from afmp.ops import select_edge_backend
from afmp.ops.edge import gather_neighbours, topk_keep


def edge_set(neighbors, mask) -> set[tuple[int, int]]:
    neighbors, mask = np.asarray(neighbors), np.asarray(mask)
    return {(i, int(j)) for i in range(len(neighbors)) for j, m in zip(neighbors[i], mask[i]) if m}


def both_ways(pairs) -> set[tuple[int, int]]:
    return {(a, b) for a, b in pairs} | {(b, a) for a, b in pairs}


def test_delaunay_of_a_square_and_its_centre_with_scale_free_lengths():
    square = np.array([[0, 0], [2, 0], [0, 2], [2, 2], [1, 1]], dtype=np.float64)
    g = point_graph(square)
    sides = [(0, 1), (0, 2), (1, 3), (2, 3)]
    spokes = [(4, 0), (4, 1), (4, 2), (4, 3)]
    assert edge_set(g["neighbors"], g["mask"]) == both_ways(sides + spokes)
    # Every point's nearest other point is sqrt(2) away: that is the unit.
    lengths = {
        (i, int(j)): float(l)
        for i in range(5)
        for j, l, m in zip(g["neighbors"][i], g["length"][i], g["mask"][i])
        if m
    }
    assert lengths[(0, 1)] == pytest.approx(math.sqrt(2), rel=1e-6)
    assert lengths[(4, 3)] == pytest.approx(1.0, rel=1e-6)
    scaled = point_graph(square * 10 + 3)
    np.testing.assert_allclose(scaled["length"], g["length"], rtol=1e-6)
    assert (g["neighbors"][~g["mask"]] == np.nonzero(~g["mask"])[0]).all()  # padding: the token itself


def test_delaunay_in_3d_and_knn():
    tetra = np.array([[0, 0, 0], [4, 0, 0], [0, 4, 0], [0, 0, 4], [1, 1, 1]], dtype=np.float64)
    g = point_graph(tetra)
    outer = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    assert edge_set(g["neighbors"], g["mask"]) == both_ways(outer + [(4, i) for i in range(4)])
    line = np.array([[0, 0], [1, 0], [3, 0], [7, 0]], dtype=np.float64)
    g = point_graph(line, graph="knn", k=1)  # each to its nearest, symmetrised
    assert edge_set(g["neighbors"], g["mask"]) == both_ways([(0, 1), (1, 2), (2, 3)])
    with pytest.raises(ValueError, match="graph must be one of"):
        point_graph(line, graph="radius")


def test_collate_pads_tokens_and_slots():
    small = {"features": np.ones((3, 1), np.float32), "positions": np.zeros((3, 2), np.float32)}
    small.update(point_graph(np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])))  # a chain: 0-1-2
    big = {"features": np.ones((4, 1), np.float32), "positions": np.zeros((4, 2), np.float32)}
    big.update(point_graph(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])))
    x, labels = collate_point_sets([(small, 1), (big, 2)])
    assert labels.tolist() == [1, 2]
    assert x["valid"].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert x["neighbors"].shape == (2, 4, 3)  # big's token 1 or 2 has three neighbours
    # Padding slots and the padding token point at themselves.
    assert x["neighbors"][0].tolist() == [[1, 0, 0], [0, 2, 1], [1, 2, 2], [3, 3, 3]]
    assert x["mask"][0].tolist() == [
        [True, False, False],
        [True, True, False],
        [True, False, False],
        [False] * 3,
    ]
    assert x["mask"][1].sum() == 10  # 5 edges of 4 points, both ways


def test_topk_keeps_each_examples_own_share():
    s = torch.tensor([[[0.9, 0.1], [0.5, 0.7]], [[0.3, 0.8], [0.2, 0.6]]], dtype=torch.float64)
    mask = torch.tensor([[[True, True], [True, True]], [[True, True], [False, False]]])
    keep = topk_keep(s, mask, mask.flatten(1).sum(1), 0.5)
    # Example 0 keeps 2 of 4 (0.9, 0.7); example 1 keeps 1 of its 2 (0.8), never a non-edge.
    assert keep.tolist() == [[[True, False], [False, True]], [[False, True], [False, False]]]


def test_topk_per_example_rounds_half_to_even_keeps_ties_and_never_a_padding_slot():
    """Example b keeps E_b - round(0.5 * E_b) of its E_b edges (2.5 -> 2, 1.5 -> 2: half to
    even), its best real ones; padding slots stay dropped however high they score, tied best
    edges both stay, and an example without edges keeps nothing."""
    t, f = True, False
    mask = torch.tensor(
        [
            [[t, t, t, f], [t, t, f, f]],  # 5 edges: keep 3
            [[t, f, f, f], [t, t, f, f]],  # 3 edges: keep 1
            [[f, f, f, f], [f, f, f, f]],  # none
        ]
    )
    s = torch.tensor(
        [
            [[0.2, 0.9, 0.9, 5.0], [-1.0, 0.4, 7.0, 7.0]],
            [[3.0, 9.0, 9.0, 9.0], [-2.0, 3.5, 3.5, 8.0]],
            [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]],
        ]
    )
    keep = topk_keep(s, mask, torch.tensor([5, 3, 0]), 0.5)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [
        [[f, t, t, f], [f, t, f, f]],
        [[f, f, f, f], [f, t, f, f]],
        [[f, f, f, f], [f, f, f, f]],
    ]


def test_gather_neighbours_reads_each_examples_own_rows():
    """(B, N, K) lists index rows of the flattened (B*N, C) batch; (N, K) lists are the same
    for every example. Literal rows of x = 0..11 as (2 examples, 3 tokens, 2 channels)."""
    x = torch.arange(12.0).view(2, 3, 2)  # row r of the flat batch is [2r, 2r + 1]
    per_example = torch.tensor([[[1, 2], [0, 0], [2, 1]], [[4, 3], [5, 5], [3, 4]]])
    assert gather_neighbours(x, per_example).tolist() == [
        [[[2, 3], [4, 5]], [[0, 1], [0, 1]], [[4, 5], [2, 3]]],
        [[[8, 9], [6, 7]], [[10, 11], [10, 11]], [[6, 7], [8, 9]]],
    ]
    shared = torch.tensor([[1, 2], [0, 0], [2, 1]])
    assert gather_neighbours(x, shared).tolist() == [
        [[[2, 3], [4, 5]], [[0, 1], [0, 1]], [[4, 5], [2, 3]]],
        [[[8, 9], [10, 11]], [[6, 7], [6, 7]], [[10, 11], [8, 9]]],
    ]


def grid_model_and_its_point_twin(layout: str):
    torch.manual_seed(0)
    opts = dict(num_layers=3, d_model=16, k_dim=8, score_hidden=8, sparsity=0.3, num_classes=5)
    grid = afmp.create_model(
        "afmp_tiny", img_size=8, patch_size=2, in_chans=2, scaffold=layout, backend="reference", **opts
    )
    points = afmp.create_model("afmp_points", in_features=2 * 2 * 2, backend="reference", **opts)
    state = {k: v for k, v in grid.state_dict().items() if not k.startswith("patch_embed")}
    state["embed.weight"] = grid.patch_embed.proj.weight.flatten(1)  # (D, C*p*p), unfold's order
    state["embed.bias"] = grid.patch_embed.proj.bias
    points.load_state_dict(state)
    return grid.double().eval(), points.double().eval()


@pytest.mark.parametrize("layout", ["delaunay_qhull", "delaunay"])
def test_a_grid_given_as_points_computes_what_the_grid_model_computes(layout):
    grid, points = grid_model_and_its_point_twin(layout)
    images = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    positions = grid_centres(4, 4).double().numpy()
    if layout == "delaunay_qhull":  # the pipeline's own Delaunay of the patch centres
        graph = point_graph(positions)
    else:  # any grid layout, from its edges
        sc = scaffolds.build(layout, 4, 4)
        edges = [(i, int(j)) for i, j in edge_set(sc.neighbors, sc.mask)]
        graph = point_graph(positions)  # lengths' unit: the grid spacing
        lists = scaffolds.from_edges(np.array(edges), positions)
        graph = {
            "neighbors": lists.neighbors.numpy(),
            "mask": lists.mask.numpy(),
            "length": lists.length.numpy() * 4,
        }
    patches = F.unfold(images, 2, stride=2).transpose(1, 2)  # (B, 16, C*2*2)
    examples = [({"features": p.numpy(), "positions": positions, **graph}, 0) for p in patches]
    x = {k: v.double() if v.is_floating_point() else v for k, v in collate_point_sets(examples)[0].items()}
    want, want_aux = grid(images, return_aux=True)
    got, got_aux = points(x, return_aux=True)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_aux["sparsity_loss"], want_aux["sparsity_loss"], rtol=1e-12, atol=0)


def test_padding_changes_nothing_and_gather_matches_the_reference():
    torch.manual_seed(0)
    model = afmp.create_model(
        "afmp_points", d_model=16, k_dim=8, score_hidden=8, backend="reference"
    ).double()
    ragged = example_point_batch(3, 3, 2, num_points=10, ragged=True)
    x = {k: v.double() if v.is_floating_point() else v for k, v in ragged.items()}
    # The last example has 7 of 10 tokens: alone (no padding) it gives the same logits.
    alone = {k: v[2:, :7] for k, v in x.items()}
    alone["neighbors"] = alone["neighbors"][..., : int(x["mask"][2].sum(-1).max())]
    for key in ("mask", "length"):
        alone[key] = alone[key][..., : alone["neighbors"].shape[-1]]
    torch.testing.assert_close(model(alone)[0], model(x)[2], rtol=1e-12, atol=1e-12)
    # The gather backend, forward and every gradient, on scaffolds of each example's own.
    twin = afmp.create_model("afmp_points", d_model=16, k_dim=8, score_hidden=8, backend="gather").double()
    twin.load_state_dict(model.state_dict())
    for m in (model, twin):
        logits, aux = m(x, return_aux=True)
        (logits.square().sum() + aux["sparsity_loss"] * 1e3).backward()
    torch.testing.assert_close(twin(x), model(x), rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert select_edge_backend("auto", "cpu", model.scaffold(x)).name == "gather"


def test_bbox_frame_makes_the_model_blind_to_where_and_how_big():
    torch.manual_seed(0)
    model = afmp.create_model(
        "afmp_points", position_frame="bbox", d_model=16, k_dim=8, score_hidden=8
    ).double()
    x = {k: v.double() if v.is_floating_point() else v for k, v in model.example_input(2).items()}
    moved = dict(x, positions=x["positions"] * 7 - 3)
    torch.testing.assert_close(model(moved), model(x), rtol=1e-10, atol=1e-10)
    given = afmp.create_model("afmp_points", d_model=16, k_dim=8, score_hidden=8).double()
    given.load_state_dict(model.state_dict())
    assert not torch.allclose(given(moved), given(x))  # without it, positions count as given


def test_a_point_model_names_what_it_takes():
    model = afmp.create_model("afmp_points")
    with pytest.raises(ValueError, match="takes a dict with features, positions"):
        model(torch.zeros(2, 3, 8, 8))
    x = model.example_input(2)
    with pytest.raises(ValueError, match="'positions' has shape"):
        model(dict(x, positions=x["positions"][..., :1]))


def test_the_length_unit_is_the_mean_nearest_neighbour_distance():
    line = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])  # nearest: 1, 1, 2 -> unit 4/3
    g = point_graph(line)
    assert g["length"][0][g["mask"][0]].tolist() == pytest.approx([0.75])
    assert sorted(g["length"][2][g["mask"][2]].tolist()) == pytest.approx([1.5])


def test_bbox_frame_maps_the_largest_side_onto_the_unit_interval():
    from afmp.models.points.afmp_sets import bbox_frame

    positions = torch.tensor([[[1.0, 1.0], [5.0, 3.0], [99.0, -99.0]]])
    valid = torch.tensor([[True, True, False]])  # the padding token's position is ignored
    assert bbox_frame(positions, valid).tolist() == [[[0.0, 0.0], [1.0, 0.5], [0.0, 0.0]]]


def test_the_sparsity_loss_averages_gates_over_every_real_edge_of_the_batch():
    torch.manual_seed(0)
    model = afmp.create_model("afmp_points", d_model=16, k_dim=8, score_hidden=8, lambda_sparse=0.5)
    x = example_point_batch(3, 3, 2, num_points=10, ragged=True)
    _, aux = model(x, return_aux=True)
    per_layer = torch.stack([g.sum() for g in aux["gates"]]) / x["mask"].sum()  # 3 sets of unequal E_b
    torch.testing.assert_close(aux["sparsity_loss"], 0.5 * per_layer.mean())


@pytest.mark.parametrize(
    "positions, message",
    [
        ([[0, 0], [1, 0]], "needs at least 3 points"),
        ([[0, 0], [1, 0], [float("nan"), 1]], "position 2 is not finite"),
        ([[0, 0], [1, 0], [0, 1], [1, 0]], "points 1 and 3 share the position"),
        ([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]], r"\(N, 2\) or \(N, 3\)"),
    ],
)
def test_positions_no_scaffold_can_be_built_on_are_refused(positions, message):
    with pytest.raises(ValueError, match=message):
        point_graph(np.array(positions, dtype=np.float64))


def test_a_batch_with_an_empty_set_is_refused():
    model = afmp.create_model("afmp_points")
    x = model.example_input(2)
    with pytest.raises(ValueError, match="example 1 of the point batch marks no token valid"):
        model(dict(x, valid=torch.tensor([[True] * 12, [False] * 12])))


def test_reordering_a_set_reorders_its_states_and_keeps_its_logits():
    torch.manual_seed(0)
    model = afmp.create_model("afmp_points", d_model=16, k_dim=8, score_hidden=8).double().eval()
    gen = np.random.default_rng(1)
    positions = gen.random((9, 2))
    features = gen.standard_normal((9, 3))
    perm = gen.permutation(9)
    examples = [
        ({"features": f, "positions": p, **point_graph(p)}, 0)
        for f, p in ((features, positions), (features[perm], positions[perm]))
    ]
    x = collate_point_sets(examples)[0]
    states = model.forward_features(x)
    torch.testing.assert_close(states[1], states[0][perm], rtol=1e-10, atol=1e-12)
    logits = model(x)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-10, atol=1e-12)
