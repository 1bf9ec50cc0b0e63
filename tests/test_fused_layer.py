"""The whole AFMP layer as one autograd op (afmp.ops.fused_layer, what the ``gather`` backend
runs in a model) against the layer computed with the reference backend, in float64.

The model-level tests (tests/test_edge_backends.py::test_afmp_model_equals_the_reference and
tests/test_point_sets.py) compare whole models through it; these compare one layer, where a
case can be arranged exactly: a prediction error of exactly 0, and the layer being one node.
"""

import pytest
import torch

from afmp import scaffold
from afmp.models.afmp import RouterPCULayer
from afmp.ops import EDGE_BACKENDS

f64 = torch.float64
B, D, R, F = 2, 6, 4, 5


def _layers(sparsity: float, seed: int = 0):
    torch.manual_seed(seed)
    layer = RouterPCULayer(d_model=D, k_dim=R, score_hidden=F, sparsity=sparsity, predictive=True).double()
    for p in layer.parameters():  # no parameter left at a special value (a zero bias hides terms)
        p.data.normal_(0, 0.5)
    return layer


def _run(layer, backend, h, t, sc, cot_out, cot_gm):
    be = EDGE_BACKENDS[backend]
    out, gm = layer(h, t, be.prepare(sc, h), be)
    grads = torch.autograd.grad((out * cot_out).sum() + (gm * cot_gm).sum(), [h, t, *layer.parameters()])
    return out, gm, grads


@pytest.mark.parametrize("sparsity", [0.0, 0.4])
def test_the_fused_layer_is_one_autograd_node_computing_the_reference_layer(sparsity):
    sc = scaffold.delaunay_grid(4, 5)
    layer = _layers(sparsity)
    gen = torch.Generator().manual_seed(1)
    h, t, cot_out = (torch.randn(B, 20, D, generator=gen, dtype=f64) for _ in range(3))
    cot_gm = torch.randn(B, 20, sc.max_degree, generator=gen, dtype=f64)
    h.requires_grad_(), t.requires_grad_()
    want = _run(layer, "reference", h, t, sc, cot_out, cot_gm)
    got = _run(layer, "gather", h, t, sc, cot_out, cot_gm)
    assert got[0].grad_fn.name() == "_LayerBackward"  # one node: autograd replays nothing
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    names = ["h", "t", *(n for n, _ in layer.named_parameters())]
    for name, g, w in zip(names, got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"grad of {name}")


def test_a_prediction_error_of_zero_passes_no_gradient_through_the_norm():
    # Every state the same row and W_pred t + c_pred = that row: every edge's error |h_j - p_i|
    # is exactly 0, where the norm's gradient is 0 (torch.linalg.vector_norm's), not 0/0.
    sc = scaffold.delaunay_grid(3, 3)
    layer = _layers(0.0)
    row = torch.randn(D, dtype=f64)
    with torch.no_grad():
        layer.pred.weight.copy_(torch.eye(D, dtype=f64))
        layer.pred.bias.zero_()
    h = row.expand(B, 9, D).clone().requires_grad_()
    t = row.expand(B, 9, D).clone().requires_grad_()
    cot_out, cot_gm = torch.randn(B, 9, D, dtype=f64), torch.randn(B, 9, sc.max_degree, dtype=f64)
    want = _run(layer, "reference", h, t, sc, cot_out, cot_gm)
    got = _run(layer, "gather", h, t, sc, cot_out, cot_gm)
    assert all(bool(g.isfinite().all()) for g in got[2])
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert not got[2][1].any()  # t reaches the layer through the error alone


def test_a_second_backward_through_the_fused_layer_is_refused_not_wrong():
    # Its backward overwrites saved buffers: backpropagating twice must fail loudly.
    sc = scaffold.delaunay_grid(3, 3)
    layer = _layers(0.0)
    h, t = (torch.randn(B, 9, D, dtype=f64, requires_grad=True) for _ in range(2))
    be = EDGE_BACKENDS["gather"]
    out, gm = layer(h, t, be.prepare(sc, h), be)
    (out.sum() + gm.sum()).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward once per forward"):
        (out.sum() + gm.sum()).backward()
