"""The plain-PyTorch backends of the per-edge stage (packed, gather, stencil) against the reference.

Everything runs in float64 on the same values, so a backend must agree with the padded
reference to rounding: scores in the real slots, the aggregate, the gate means, and
every gradient. Padding scores mean nothing in the reference (they pair a token with
itself); packed, gather and stencil give exactly 0 there and pass no gradient back, and the
model never reads them (``keep`` is False in every padding slot), so gradients are
compared for cotangents that are 0 in padding, as in the model.
"""

import pytest
import torch
from safetensors.torch import load_file

import afmp
from afmp import scaffold
from afmp.ops import EDGE_BACKENDS, edge, packed_edge, select_edge_backend
from afmp.ops.edge import topk_keep

SCAFFOLDS = {
    "delaunay5x7": lambda: scaffold.delaunay_grid(5, 7),  # 6 offsets, border padding
    "qhull5x7": lambda: scaffold.delaunay_qhull_grid(5, 7),  # 8 offsets, interior mask too
    "window4x5r2": lambda: scaffold.window_grid(4, 5, 2),  # radius 2: a halo of two
    "delaunay1x6": lambda: scaffold.delaunay_grid(1, 6),  # a 1-wide grid: a chain
    "delaunay6x1": lambda: scaffold.delaunay_grid(6, 1),
    "window9r3": lambda: scaffold.window(9, 3),  # 1-D
}
BACKENDS = ["packed", "gather", "stencil"]
B, R, F, D = 2, 5, 6, 11
f64 = torch.float64


def _leaves(gen, *shapes):
    return [torch.randn(shape, generator=gen, dtype=f64).requires_grad_() for shape in shapes]


def _grads(outputs, inputs, cotangents):
    grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def test_edge_list_of_a_hand_made_layout():
    # window(4, 1): slot 0 is offset -1, slot 1 offset +1; token 0 has no left, token 3 no right.
    sc = scaffold.window(4, 1)
    assert sc.neighbors.tolist() == [[0, 1], [0, 2], [1, 3], [2, 3]]
    assert sc.mask.tolist() == [[False, True], [True, True], [True, True], [True, False]]
    assert sc.slots.tolist() == [1, 2, 3, 4, 5, 6]
    slots, dst, src = packed_edge.edge_list(sc.neighbors, sc.slots)
    assert dst.tolist() == [0, 1, 1, 2, 2, 3]
    assert src.tolist() == [1, 0, 2, 1, 3, 2]
    recomputed = packed_edge.edge_list(sc.neighbors)  # from the padding convention alone
    assert all(torch.equal(x, y) for x, y in zip(recomputed, (slots, dst, src)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SCAFFOLDS))
@pytest.mark.parametrize("with_p", [True, False])
def test_edge_scores_and_gradients_equal_the_reference(backend, name, with_p):
    sc = SCAFFOLDS[name]()
    n, kk = sc.neighbors.shape
    gen = torch.Generator().manual_seed(0)
    q, k, a, b, h = _leaves(gen, (B, n, R), (B, n, R), (B, n, F), (B, n, F), (B, n, D))
    p, w_err = _leaves(gen, (B, n, D), (F,)) if with_p else (None, None)
    w_len, w_out, b_out = _leaves(gen, (F,), (F,), ())
    inputs = [q, k, a, b, h, p, w_err, w_len, w_out, b_out]

    got = EDGE_BACKENDS[backend].edge_scores(*inputs, sc)
    want = edge.edge_scores(*inputs, sc)
    assert got.shape == want.shape == (B, n, kk)
    torch.testing.assert_close(got[:, sc.mask], want[:, sc.mask], rtol=1e-12, atol=1e-12)
    assert not got[:, ~sc.mask].any(), "padding slots score 0"

    ds = torch.randn(want.shape, generator=gen, dtype=f64) * sc.mask
    live = [x for x in inputs if x is not None]
    for g, w in zip(_grads(got, live, ds), _grads(want, live, ds)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_slots_pass_no_gradient_back(backend):
    sc = SCAFFOLDS["delaunay5x7"]()
    n, kk = sc.neighbors.shape
    gen = torch.Generator().manual_seed(5)
    inputs = _leaves(
        gen, (B, n, R), (B, n, R), (B, n, F), (B, n, F), (B, n, D), (B, n, D), (F,), (F,), (F,), ()
    )
    ds = torch.randn((B, n, kk), generator=gen, dtype=f64)
    assert (~sc.mask).any()  # the border has padding slots, which get a cotangent here
    grads = [_grads(EDGE_BACKENDS[backend].edge_scores(*inputs, sc), inputs, c) for c in (ds, ds * sc.mask)]
    for full, masked in zip(*grads):
        torch.testing.assert_close(full, masked, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_a_prediction_error_of_zero_has_a_finite_gradient(backend):
    # Every state and prediction the same row: every edge's error |h_j - p_i| is exactly 0,
    # where the norm's gradient is taken as 0 (as torch.linalg.vector_norm's), not 0/0.
    sc = SCAFFOLDS["delaunay5x7"]()
    n, kk = sc.neighbors.shape
    gen = torch.Generator().manual_seed(6)
    q, k, a, b, w_err, w_len, w_out, b_out = _leaves(
        gen, (B, n, R), (B, n, R), (B, n, F), (B, n, F), (F,), (F,), (F,), ()
    )
    row = torch.randn(D, generator=gen, dtype=f64)
    h, p = (row.expand(B, n, D).clone().requires_grad_() for _ in range(2))
    inputs = [q, k, a, b, h, p, w_err, w_len, w_out, b_out]
    scores = EDGE_BACKENDS[backend].edge_scores(*inputs, sc)
    ds = torch.randn((B, n, kk), generator=gen, dtype=f64) * sc.mask
    grads = _grads(scores, inputs, ds)
    assert all(bool(g.isfinite().all()) for g in grads)
    assert not grads[4].any() and not grads[5].any()  # no gradient through a zero error


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SCAFFOLDS))
@pytest.mark.parametrize("sparsity", [0.0, 0.4])
def test_gated_aggregate_and_gradients_equal_the_reference(backend, name, sparsity):
    sc = SCAFFOLDS[name]()
    n, kk = sc.neighbors.shape
    gen = torch.Generator().manual_seed(1)
    s, m, w_g, b_g = _leaves(gen, (B, n, kk), (B, n, D), (D,), (D,))
    keep = topk_keep(s, sc.mask, sc.num_edges, sparsity)
    inputs = [s, m, w_g, b_g]

    got = EDGE_BACKENDS[backend].gated_aggregate(s, keep, m, w_g, b_g, sc)
    want = edge.gated_aggregate(s, keep, m, w_g, b_g, sc)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert not got[1][~keep].any(), "a pruned or padding edge's gate is exactly 0"
    assert bool((got[1][keep] > 0).all()), "a kept edge's gate is a sigmoid: positive"

    cotangents = [torch.randn(w.shape, generator=gen, dtype=f64) for w in want]
    for g, w in zip(_grads(got, inputs, cotangents), _grads(want, inputs, cotangents)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_the_stencil_backend_refuses_a_scaffold_that_is_no_stencil():
    sc = scaffold.delaunay(scaffold.grid_positions(9, 9))  # positions, not a stencil: 81 tokens
    assert sc.stencil is None
    with pytest.raises(RuntimeError, match="not a stencil"):
        select_edge_backend("stencil", "cpu", sc)
    assert select_edge_backend("auto", "cpu", sc).name == "gather"  # the next fastest that can


def test_auto_on_the_cpu_picks_the_stencil_from_a_10x10_grid_up():
    assert select_edge_backend("auto", "cpu", scaffold.delaunay_grid(10, 10)).name == "stencil"
    assert select_edge_backend("auto", "cpu", scaffold.delaunay_grid(8, 8)).name == "gather"
    assert select_edge_backend("auto", "cpu", scaffold.delaunay_grid(28, 28)).name == "stencil"
    assert select_edge_backend("auto", "cpu", scaffold.delaunay_grid(7, 7)).name == "gather"  # mnist5k
    assert select_edge_backend("auto", "cpu", scaffold.delaunay_grid(4, 4)).name == "gather"  # digits
    assert select_edge_backend("reference", "cpu").name == "reference"
    # Compiled, the stencil at every size (a point set, no stencil, still gets gather).
    from afmp.ops import AUTO

    assert AUTO[("cpu", True)][0] == ("stencil", 0) and AUTO[("cpu", True)][1][0] == "gather"


def test_auto_on_cuda_names_only_backends_with_a_gpu_record():
    from afmp.ops import AUTO, CUDA_RECORD

    for (device, _), entries in AUTO.items():
        if device == "cuda":
            assert {name for name, _ in entries} <= set(CUDA_RECORD), "a CUDA choice without a GPU record"
    # Triton's kernels have matched the reference on a GPU but were never timed there: not auto's.
    assert all(name != "triton" for (device, _), entries in AUTO.items() for name, _ in entries)
    # What a user's first GPU run takes: the stencil on a grid, the reference on other scaffolds.
    assert select_edge_backend("auto", "cuda", scaffold.delaunay_grid(4, 4)).name == "stencil"
    assert (
        select_edge_backend("auto", "cuda", scaffold.delaunay(scaffold.grid_positions(3, 3))).name
        == "reference"
    )


MODEL = dict(img_size=16, patch_size=4, num_layers=3, d_model=12, k_dim=5, score_hidden=6, num_classes=7)


def _run(model, x):
    logits, aux = model(x, return_aux=True)
    (logits.square().sum() + aux["sparsity_loss"] * 1e3).backward()
    return logits, aux["gates"], {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("layout", "sparsity", "shape"),
    [
        ("delaunay", 0.3, (16, 16)),  # the default grid (the model's buffers)
        ("delaunay", 0.0, (20, 28)),  # dense, a rectangular grid built on the fly
        ("delaunay_qhull", 0.3, (16, 16)),
        ("delaunay_qhull", 0.3, (4, 24)),  # a 1-wide grid
        ("window", 0.3, (20, 16)),
    ],
)
def test_afmp_model_equals_the_reference(backend, layout, sparsity, shape):
    cfg = dict(MODEL, scaffold=layout, sparsity=sparsity, window_radius=2)
    torch.manual_seed(3)
    ref = afmp.create_model("afmp_tiny", backend="reference", **cfg).double()
    fast = afmp.create_model("afmp_tiny", backend=backend, **cfg).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, *shape, dtype=f64)
    (l_ref, gates_ref, g_ref), (l_fast, gates_fast, g_fast) = _run(ref, x), _run(fast, x)
    torch.testing.assert_close(l_fast, l_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(gates_fast, gates_ref):
        assert torch.equal(got == 0, want == 0), "the same edges are kept"
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for n, g in g_ref.items():
        torch.testing.assert_close(g_fast[n], g, rtol=1e-10, atol=1e-10, msg=f"grad of {n}")


def test_window_scaffold_from_the_model():
    model = afmp.create_model("afmp_tiny", scaffold="window", window_radius=2, img_size=40)
    sc = model.scaffold_for((5, 5))
    assert sc.max_degree == 24 and sc.stencil.radius == 2
    assert model.edge_mask.shape == (25, 24) and int(model.edge_mask[12].sum()) == 24  # the centre
    with pytest.raises(ValueError, match="window_radius must be a positive integer"):
        afmp.create_model("afmp_tiny", scaffold="window", window_radius=0)
    with pytest.raises(ValueError, match="scaffold must be one of delaunay, delaunay_qhull, window"):
        afmp.create_model("afmp_tiny", scaffold="knn")


def test_stencil_model_compiles_without_graph_breaks():
    """fullgraph=True fails on a graph break; aot_eager traces the hand-written backward too."""
    torch._dynamo.reset()
    cfg = dict(MODEL, num_layers=2)
    torch.manual_seed(4)
    eager = afmp.create_model("afmp_tiny", backend="stencil", **cfg)
    traced = afmp.create_model("afmp_tiny", backend="stencil", **cfg)
    traced.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(traced, backend="aot_eager", fullgraph=True)
    (l_eager, _, g_eager), (l_comp, _, _) = _run(eager, x), _run(compiled, x)
    torch.testing.assert_close(l_comp, l_eager)
    for n, p in traced.named_parameters():
        torch.testing.assert_close(p.grad, g_eager[n], msg=f"compiled grad of {n}")


FORMAT1 = "tests/data/afmp_format1"  # saved by the code before format 2 (scaffold "delaunay" = Qhull's)


@pytest.mark.parametrize("backend", ["reference", "stencil"])
def test_a_checkpoint_saved_before_format_2_computes_what_it_did(backend):
    model = afmp.load_checkpoint(FORMAT1, backend=backend).eval()
    assert model.cfg.scaffold == "delaunay_qhull"
    expected = load_file(f"{FORMAT1}/expected.safetensors")  # input, logits, kept edges of the old code
    with torch.no_grad():
        logits, aux = model(expected["input"], return_aux=True)
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    nbr = model.neighbors
    kept = torch.stack([g != 0 for g in aux["gates"]]).nonzero()
    edges = sorted((l, b, i, int(nbr[i, k])) for l, b, i, k in kept.tolist())
    assert edges == sorted(map(tuple, expected["kept_edges"].tolist()))


def test_a_checkpoint_saves_its_format_and_a_newer_one_is_refused(tmp_path):
    model = afmp.create_model("afmp_tiny", **MODEL)
    afmp.save_checkpoint(model, tmp_path)
    assert afmp.load_checkpoint(tmp_path).cfg.scaffold == "delaunay"  # format 2: no upgrade
    spec = (tmp_path / "model.json").read_text()
    assert '"format": 2' in spec
    (tmp_path / "model.json").write_text(spec.replace('"format": 2', '"format": 3'))
    with pytest.raises(ValueError, match="format 3"):
        afmp.load_checkpoint(tmp_path)


def test_a_backend_family_walks_its_preference_list_and_says_why_not(monkeypatch):
    from afmp.ops import backends, linear_attention

    family = backends.BackendFamily("toy", {("cpu", False): [("fast", 10), ("reference", 0)]})
    family.register(backends.Backend(name="reference"))
    family.register(
        backends.Backend(name="fast", input_why_not=lambda arg: "odd input" if arg == "bad" else None)
    )
    assert family.names() == ["auto", "reference", "fast"]
    assert family.select("auto", "cpu", "ok", size=10).name == "fast"
    assert family.select("auto", "cpu", "ok", size=9).name == "reference"  # below its size
    assert family.select("auto", "cpu", "bad", size=10).name == "reference"  # cannot take the input
    assert family.select("auto", "meta", "ok", size=10).name == "reference"  # no list for the device
    with pytest.raises(RuntimeError, match="toy backend 'fast' cannot run here: odd input"):
        family.select("fast", "cpu", "bad")
    with pytest.raises(ValueError, match="unknown toy backend 'slow'; choose one of auto, reference, fast"):
        family.select("slow", "cpu")

    # Linear attention is a family of the same shape; TRITON_INTERPRET is read in one place.
    monkeypatch.setattr(backends, "triton_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="linear-attention backend 'triton' cannot run here: .*CUDA"):
        linear_attention.select_linear_attention("triton", "cpu")
    assert (
        linear_attention.select_linear_attention("auto", "cpu") is linear_attention.linear_attention_reference
    )
    if linear_attention._triton_impl is not None:
        monkeypatch.setattr(backends, "triton_interpreted", lambda: True)
        assert linear_attention.select_linear_attention("triton", "cpu") is linear_attention._triton
        # ... but auto never trains through the interpreter
        assert (
            linear_attention.select_linear_attention("auto", "cpu")
            is linear_attention.linear_attention_reference
        )


def test_the_gpu_scripts_crosscheck_passes_on_the_cpu_and_names_a_backend_that_differs(monkeypatch):
    from afmp.ops import EdgeBackend, crosscheck

    grids, dtypes = [(1, 5), (3, 4)], [torch.float32, torch.bfloat16]
    assert (
        crosscheck.crosscheck("cpu", dtypes, grids, ["packed", "gather", "stencil"], log=lambda *a: None)
        == []
    )
    # bfloat16 on a large grid: gather's dw_len is off by more than 3e-2 there, and so is the
    # reference's own bfloat16 run (by about half as much): the slack lets it pass.
    assert crosscheck.crosscheck("cpu", [torch.bfloat16], [(64, 64)], ["gather"], log=lambda *a: None) == []

    def off_by_a_little(s, keep, m, w_g, b_g, sc):  # the reference's aggregate, 0.1% too large
        out, gate_mean = edge.gated_aggregate(s, keep, m, w_g, b_g, sc)
        return out * 1.001, gate_mean

    broken = EdgeBackend(name="broken", edge_scores=edge.edge_scores, gated_aggregate=off_by_a_little)
    monkeypatch.setitem(EDGE_BACKENDS, "broken", broken)
    found = crosscheck.crosscheck("cpu", [torch.float32], [(3, 4)], ["broken"], log=lambda *a: None)
    # The stage's aggregate, and the layer built on it: both named, each off by the 0.1%, not rounding.
    assert [(m.backend, m.what.startswith("layer")) for m in found] == [("broken", False), ("broken", True)]
    assert 5e-4 < found[0].error < 2e-3
    assert str(found[0]).startswith("backend 'broken' differs from the reference on a 3x4 grid in float32: ")

    # Right halves, a wrong whole layer (as a fused layer could be): the layer check names it.
    gather = EDGE_BACKENDS["gather"]

    def layer_a_little_off(h, t, weights, prep, sparsity):
        out, gate_mean = gather.layer(h, t, weights, prep, sparsity)
        return out, gate_mean * 1.001

    fused_off = EdgeBackend(
        name="fused_off",
        edge_scores=gather.edge_scores,
        gated_aggregate=gather.gated_aggregate,
        layer=layer_a_little_off,
        prepare=gather.prepare,
    )
    monkeypatch.setitem(EDGE_BACKENDS, "fused_off", fused_off)
    found = crosscheck.crosscheck("cpu", [torch.float32], [(3, 4)], ["fused_off"], log=lambda *a: None)
    assert [(m.backend, m.what) for m in found] == [("fused_off", "layer gate means")]
