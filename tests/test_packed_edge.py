"""The packed per-edge stage (real edges only) against the padded plain-PyTorch reference.

Both run in float64 on the same values, so they must agree to rounding. In the model,
``keep`` is False in every padding slot (topk_keep), so nothing flows through padding
there: the tests hold to that contract, and compare scores in the real slots only.
"""

import pytest
import torch

import afmp
from afmp import scaffold
from afmp.ops import edge, packed_edge, select_edge_backend

SCAFFOLDS = {
    "delaunay5x7": lambda: scaffold.delaunay_grid(5, 7),  # K = 8, degrees 2..8
    "window9r3": lambda: scaffold.window(9, 3),  # padding at both ends
}
B, R, F, D = 2, 5, 6, 11
f64 = torch.float64


def _leaves(gen, *shapes):
    return [torch.randn(shape, generator=gen, dtype=f64).requires_grad_() for shape in shapes]


def _grads(outputs, inputs, cotangents):
    grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def test_edge_list_of_a_hand_made_layout():
    # window(4, 1): 0 <- 1; 1 <- 0, 2; 2 <- 1, 3; 3 <- 2; K = 2, rows 0 and 3 padded.
    sc = scaffold.window(4, 1)
    assert sc.neighbors.tolist() == [[1, 0], [0, 2], [1, 3], [2, 3]]
    assert sc.slots.tolist() == [0, 2, 3, 4, 5, 6]
    slots, dst, src = packed_edge.edge_list(sc.neighbors, sc.slots)
    assert dst.tolist() == [0, 1, 1, 2, 2, 3]
    assert src.tolist() == [1, 0, 2, 1, 3, 2]
    recomputed = packed_edge.edge_list(sc.neighbors)  # from the padding convention alone
    assert all(torch.equal(x, y) for x, y in zip(recomputed, (slots, dst, src)))


@pytest.mark.parametrize("name", list(SCAFFOLDS))
@pytest.mark.parametrize("with_p", [True, False])
def test_edge_scores_and_gradients_equal_the_reference(name, with_p):
    sc = SCAFFOLDS[name]()
    n, kk = sc.neighbors.shape
    gen = torch.Generator().manual_seed(0)
    q, k, a, b, h = _leaves(gen, (B, n, R), (B, n, R), (B, n, F), (B, n, F), (B, n, D))
    p, w_err = _leaves(gen, (B, n, D), (F,)) if with_p else (None, None)
    w_len, w_out, b_out = _leaves(gen, (F,), (F,), ())
    inputs = [q, k, a, b, h, p, w_err, w_len, w_out, b_out]
    graph = (sc.neighbors, sc.length.double())

    got = packed_edge.edge_scores(*inputs, *graph, slots=sc.slots)
    want = edge.edge_scores(*inputs, *graph)
    assert got.shape == want.shape == (B, n, kk)
    torch.testing.assert_close(got[:, sc.mask], want[:, sc.mask], rtol=1e-12, atol=1e-12)
    assert not got[:, ~sc.mask].any(), "padding slots score 0"

    ds = torch.randn(want.shape, generator=gen, dtype=f64) * sc.mask  # the model never reads padding scores
    live = [x for x in inputs if x is not None]
    for g, w in zip(_grads(got, live, ds), _grads(want, live, ds)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(SCAFFOLDS))
@pytest.mark.parametrize("sparsity", [0.0, 0.4])
def test_gated_aggregate_and_gradients_equal_the_reference(name, sparsity):
    sc = SCAFFOLDS[name]()
    n, kk = sc.neighbors.shape
    gen = torch.Generator().manual_seed(1)
    s, m, w_g, b_g = _leaves(gen, (B, n, kk), (B, n, D), (D,), (D,))
    keep = edge.topk_keep(s, sc.mask, sc.num_edges, sparsity)
    inputs = [s, m, w_g, b_g]

    got = packed_edge.gated_aggregate(s, keep, m, w_g, b_g, sc.neighbors, slots=sc.slots)
    want = edge.gated_aggregate(s, keep, m, w_g, b_g, sc.neighbors)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert not got[1][~keep].any(), "a pruned or padding edge's gate is exactly 0"

    cotangents = [torch.randn(w.shape, generator=gen, dtype=f64) for w in want]
    for g, w in zip(_grads(got, inputs, cotangents), _grads(want, inputs, cotangents)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [16, 20])  # the default grid (buffers) and another (built on the fly)
def test_afmp_model_packed_equals_reference(size):
    cfg = dict(img_size=16, patch_size=4, num_layers=3, d_model=12, k_dim=5, score_hidden=6, num_classes=7)
    torch.manual_seed(3)
    ref = afmp.create_model("afmp_tiny", backend="reference", **cfg).double()
    packed = afmp.create_model("afmp_tiny", backend="packed", **cfg).double()
    packed.load_state_dict(ref.state_dict())
    x = ref.example_input(batch_size=3, size=size).double()
    results = []
    for model in (ref, packed):
        logits, aux = model(x, return_aux=True)
        (logits.square().sum() + aux["sparsity_loss"] * 1e3).backward()
        results.append((logits, aux["gates"], {n: p.grad for n, p in model.named_parameters()}))
    (l_ref, gates_ref, g_ref), (l_packed, gates_packed, g_packed) = results
    torch.testing.assert_close(l_packed, l_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(gates_packed, gates_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for n, g in g_ref.items():
        torch.testing.assert_close(g_packed[n], g, rtol=1e-10, atol=1e-10, msg=f"grad of {n}")


def test_auto_picks_packed_on_the_cpu():
    assert select_edge_backend("auto", "cpu").name == "packed"
    assert select_edge_backend("reference", "cpu").name == "reference"
