"""Rules that hold for every input, checked on inputs hypothesis draws: scaffolds, the data
split, the per-image top-k, and the KEY=VALUE reader.

Each property is an invariant stated by the code's docstring; the literal cases live beside
the code's other tests (test_scaffold.py, test_image_data.py, test_afmp_model.py).
"""

import math

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from afmp import scaffold
from afmp.data.images import split_indices
from afmp.ops.edge import topk_keep
from afmp.utils.options import parse_key_value, parse_key_values

# Derandomized, and no example database written into the checkout: the same examples on
# every run and machine, so a failure reproduces; deadline off for a shared CPU.
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None)


# -- scaffolds ----------------------------------------------------------------------------------
def real_edges(sc) -> set[tuple[int, int]]:
    """Directed edges (i, j) of the real slots."""
    rows, slots = np.nonzero(sc.mask.numpy())
    return set(zip(rows.tolist(), sc.neighbors.numpy()[rows, slots].tolist()))


def check_padded_lists(sc, positions: np.ndarray) -> None:
    """What every scaffold promises: padding slots point at the token itself with length 0;
    real slots never do, hold no neighbour twice, and every edge exists both ways, with
    its length the distance between the two positions."""
    nbr, mask, length = sc.neighbors.numpy(), sc.mask.numpy(), sc.length.numpy()
    n = len(positions)
    own = np.arange(n)[:, None].repeat(nbr.shape[1], 1)
    assert ((nbr >= 0) & (nbr < n)).all()
    assert (nbr[~mask] == own[~mask]).all() and (length[~mask] == 0).all()
    assert (nbr[mask] != own[mask]).all(), "a self-edge in a real slot"
    for i in range(n):
        row = nbr[i][mask[i]]
        assert len(set(row.tolist())) == len(row), f"token {i} lists a neighbour twice"
    edges = real_edges(sc)
    assert edges == {(j, i) for i, j in edges}, "an edge without its reverse"
    distance = np.linalg.norm(positions[nbr] - positions[:, None, :], axis=-1)
    np.testing.assert_allclose(length[mask], distance[mask], rtol=1e-6)
    assert sc.slots.tolist() == np.flatnonzero(mask).tolist()


@FAST
@given(height=st.integers(1, 7), width=st.integers(1, 7), radius=st.integers(1, 3))
def test_window_scaffold_degree_is_the_clipped_window(height, width, radius):
    sc = scaffold.window_grid(height, width, radius)
    positions = scaffold.grid_positions(height, width)
    check_padded_lists(sc, positions)
    degree = sc.mask.sum(1).numpy()
    for i, (r, c) in enumerate(positions.astype(int)):
        rows = min(r, radius) + min(height - 1 - r, radius) + 1
        cols = min(c, radius) + min(width - 1 - c, radius) + 1
        assert degree[i] == rows * cols - 1
    assert sc.max_degree == (2 * radius + 1) ** 2 - 1


@FAST
@given(
    layout=st.sampled_from(["delaunay", "delaunay_qhull"]), height=st.integers(1, 7), width=st.integers(1, 7)
)
def test_grid_triangulations_have_every_cell_cut_once(layout, height, width):
    """A triangulated grid: the horizontal and vertical edges and one diagonal per cell."""
    sc = scaffold.build(layout, height, width)
    check_padded_lists(sc, scaffold.grid_positions(height, width))
    cells = (height - 1) * (width - 1)
    assert sc.num_edges == 2 * ((height - 1) * width + height * (width - 1) + cells)
    degree = sc.mask.sum(1)
    assert int(degree.max()) <= (6 if layout == "delaunay" else 8)
    if height * width > 1:
        assert int(degree.min()) >= 1  # connected: no token left alone


@FAST
@given(
    n=st.integers(1, 12),
    edges=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 11)), max_size=30),
)
def test_lists_from_any_edges_are_symmetric_sorted_and_loop_free(n, edges):
    """Repeated edges, both directions and self-loops in the input: one symmetric edge each, no loop."""
    edges = np.array([(a % n, b % n) for a, b in edges], dtype=np.int64).reshape(-1, 2)
    positions = np.random.default_rng(n).normal(size=(n, 2))
    sc = scaffold.from_edges(edges, positions)
    check_padded_lists(sc, positions)
    assert real_edges(sc) == {(int(a), int(b)) for a, b in edges if a != b} | {
        (int(b), int(a)) for a, b in edges if a != b
    }
    for i in range(n):
        row = sc.neighbors[i][sc.mask[i]].tolist()
        assert row == sorted(row)


# -- the data split -----------------------------------------------------------------------------
split_settings = st.fixed_dictionaries(
    {
        "labels": st.lists(st.integers(0, 3), min_size=1, max_size=80),
        "val_fraction": st.floats(0.0, 0.45),
        "test_fraction": st.floats(0.0, 0.45),
        "split_seed": st.integers(0, 2**16),
    }
)


@FAST
@given(case=split_settings, stratified=st.booleans())
def test_split_is_a_partition_of_the_requested_sizes(case, stratified):
    labels = np.array(case["labels"])
    n = len(labels)
    train, val, test = split_indices(
        n,
        val_fraction=case["val_fraction"],
        test_fraction=case["test_fraction"],
        split_seed=case["split_seed"],
        stratify=labels if stratified else None,
    )
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(n))  # disjoint, complete
    assert (len(test), len(val)) == (round(n * case["test_fraction"]), round(n * case["val_fraction"]))


@FAST
@given(case=split_settings, other_val=st.floats(0.0, 0.45))
def test_split_test_set_does_not_move_with_val_fraction(case, other_val):
    """The test split is the head of a fixed order and validation the next part of it: a
    larger val_fraction adds images to validation and takes none from the test split."""
    labels = np.array(case["labels"])
    common = dict(test_fraction=case["test_fraction"], split_seed=case["split_seed"], stratify=labels)
    _, val_a, test_a = split_indices(len(labels), val_fraction=case["val_fraction"], **common)
    _, val_b, test_b = split_indices(len(labels), val_fraction=other_val, **common)
    assert test_a.tolist() == test_b.tolist()
    shorter, longer = sorted((val_a.tolist(), val_b.tolist()), key=len)
    assert longer[: len(shorter)] == shorter


@FAST
@given(case=split_settings)
def test_stratified_split_deals_the_classes_out_in_turn(case):
    """Classes dealt out in turn: every head of the order holds the same fraction of each
    class, t n_c images to within half an image, so two classes' fractions in the test split
    (a head), or in training (what a head leaves), differ by at most 1/(2 n_a) + 1/(2 n_b);
    in validation (a difference of two heads) by twice that. A shuffled order breaks it."""
    labels = np.array(case["labels"])
    train, val, test = split_indices(
        len(labels),
        val_fraction=case["val_fraction"],
        test_fraction=case["test_fraction"],
        split_seed=case["split_seed"],
        stratify=labels,
    )
    sizes = {c: int((labels == c).sum()) for c in np.unique(labels)}
    for part, times in ((test, 1), (train, 1), (val, 2)):
        fraction = {c: (labels[part] == c).sum() / n_c for c, n_c in sizes.items()}
        for a in sizes:
            for b in sizes:
                bound = times * (0.5 / sizes[a] + 0.5 / sizes[b]) + 1e-9
                assert abs(fraction[a] - fraction[b]) <= bound, (a, b, len(part))


# -- top-k ----------------------------------------------------------------------------------------
@FAST
@given(
    data=st.data(),
    batch=st.integers(1, 3),
    tokens=st.integers(1, 6),
    slots=st.integers(1, 5),
    sparsity=st.floats(0.0, 0.95),
)
def test_topk_keeps_the_same_count_of_the_best_real_edges_in_every_image(
    data, batch, tokens, slots, sparsity
):
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=tokens * slots, max_size=tokens * slots)))
    mask = mask.view(tokens, slots)
    num_edges = int(mask.sum())
    scores = data.draw(
        st.lists(
            st.floats(-100, 100, allow_nan=False, width=32),
            min_size=batch * tokens * slots,
            max_size=batch * tokens * slots,
        )
    )
    s = torch.tensor(scores).view(batch, tokens, slots)
    keep = topk_keep(s, mask, num_edges, sparsity)
    expected = num_edges if sparsity <= 0 else num_edges - round(sparsity * num_edges)
    for b in range(batch):
        kept, dropped = s[b][keep[b]], s[b][mask & ~keep[b]]
        assert int(keep[b].sum()) == expected
        assert not (keep[b] & ~mask).any(), "a padding slot kept"
        if len(kept) and len(dropped):
            assert float(kept.min()) >= float(dropped.max())


# -- KEY=VALUE ------------------------------------------------------------------------------------
keys = st.builds(
    str.__add__,
    st.sampled_from("abcxyzABC_"),
    st.text(alphabet="abcxyz_.0123456789ABC", max_size=15),
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
values = scalars | st.lists(scalars, max_size=4)


def as_yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()


@FAST
@given(key=keys, value=values | st.text(alphabet="ab=: ", max_size=8), pad=st.sampled_from(["", " ", "  "]))
def test_key_value_round_trips_any_yaml_value(key, value, pad):
    """Any value, an "=" in it included (only the first "=" ends the key)."""
    assert parse_key_value(f"{pad}{key}{pad}={as_yaml(value)}") == (key, value)


@FAST
@given(pairs=st.dictionaries(keys, values, max_size=5))
def test_key_values_read_back_the_dict_they_were_written_from(pairs):
    assert parse_key_values([f"{k}={as_yaml(v)}" for k, v in pairs.items()]) == pairs


@FAST
@given(
    text=st.text(max_size=20).map(lambda t: t.replace("=", ""))  # no "=" at all
    | st.builds("{}={}".format, st.text(" \t", max_size=3), st.text(max_size=10))  # a blank key
)
def test_a_pair_without_a_key_is_an_error_naming_the_flag(text):
    with pytest.raises(ValueError, match=r"^-o expects KEY=VALUE \(e\.g\. sparsity=0\.5\)"):
        parse_key_value(text, flag="-o", example="sparsity=0.5")
