"""Triton kernels of the per-edge stage (stencil addressing) against the plain-PyTorch reference.

On a machine without a GPU these run through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so sizes stay tiny. Every gradient is checked: the kernels'
backward is hand-written (pull-style through the opposite offset, recomputed gates),
the reference's is autograd's. The reference runs in float64 on the same values, so a
tolerance only has to cover the kernels' own rounding (fp32 accumulation, bf16 inputs
and outputs). Padding slots score exactly 0 in the kernels and pass no gradient, while
the reference gives them a meaningless score: it is compared through the mask.
"""

import numpy as np
import pytest
import torch

from afmp import scaffold
from afmp.ops import edge, select_edge_backend

te = pytest.importorskip("afmp.ops.triton_edge")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # max error / max |reference|
SCAFFOLDS = {
    # 6 offsets, N = 35: no multiple of a tile, and tiles that start inside a row.
    "delaunay5x7": lambda: scaffold.delaunay_grid(5, 7),
    # 8 offsets with an interior mask (the diagonal Qhull did not pick is not an edge).
    "qhull5x7": lambda: scaffold.delaunay_qhull_grid(5, 7),
    # 24 offsets reaching two rows and columns away, on a grid barely wider than that.
    "window4x5r2": lambda: scaffold.window_grid(4, 5, 2),
    # 1-wide grids: a row and a column, where most slots are off the grid.
    "row1x6": lambda: scaffold.delaunay_grid(1, 6),
    "column6x1": lambda: scaffold.delaunay_grid(6, 1),
}
R, F, D = 5, 6, 11


@pytest.fixture
def tiles_of_32(monkeypatch):
    """Tiles of 32 tokens, whatever the defaults: N = 35 takes two, the second ragged and
    starting mid-row (the model's tests keep the default launch knobs)."""
    monkeypatch.setattr(te, "BLOCK_T", 32)
    monkeypatch.setattr(te, "BWD_BLOCK_T", 32)


def _leaf(gen, *shape, dtype):
    return torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_()


def _close(got, want, dtype, what):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item() + 1e-12
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} against max |ref| {scale:.3g}"


def _grads(outputs, inputs, cotangents):
    grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _scaffold(name):
    return SCAFFOLDS[name]().to(DEVICE)


def _double(inputs):
    return [None if x is None else x.detach().double().requires_grad_() for x in inputs]


SCORE_NAMES = ["q", "k", "a", "b", "h", "p", "w_err", "w_len", "w_out", "b_out"]


def _score_inputs(gen, batch, n, dtype, with_p=True, d=D):
    q, k = _leaf(gen, batch, n, R, dtype=dtype), _leaf(gen, batch, n, R, dtype=dtype)
    a, b = _leaf(gen, batch, n, F, dtype=dtype), _leaf(gen, batch, n, F, dtype=dtype)
    h = _leaf(gen, batch, n, d, dtype=dtype)
    p = _leaf(gen, batch, n, d, dtype=dtype) if with_p else None
    w_err = _leaf(gen, F, dtype=dtype) if with_p else None
    w_len, w_out, b_out = _leaf(gen, F, dtype=dtype), _leaf(gen, F, dtype=dtype), _leaf(gen, dtype=dtype)
    return [q, k, a, b, h, p, w_err, w_len, w_out, b_out]


def _check_scores(sc, inputs, dtype, gen):
    """Scores and every gradient of the kernels against the float64 reference."""
    with_p = inputs[5] is not None
    got = te.edge_scores(*inputs, sc)
    ref_inputs = _double(inputs)
    want = edge.edge_scores(*ref_inputs, sc)
    assert got.shape == want.shape == (inputs[0].shape[0], *sc.mask.shape) and got.dtype == dtype
    _close(got * sc.mask, want * sc.mask, dtype, "s")
    assert not got[:, ~sc.mask].any(), "a padding slot scores exactly 0"

    # The kernels get ds in every slot and must drop the padding's; the reference gets it masked.
    ds = torch.randn(want.shape, generator=gen).to(DEVICE, dtype)
    live = [i for i, x in enumerate(inputs) if x is not None]
    got_g = _grads(got, [inputs[i] for i in live], ds)
    want_g = _grads(want, [ref_inputs[i] for i in live], ds.double() * sc.mask)
    for i, g, w in zip(live, got_g, want_g):
        assert g.dtype == inputs[i].dtype
        if SCORE_NAMES[i] == "h" and not with_p:
            assert not g.any(), "h enters only through the prediction error"
        else:
            _close(g, w, dtype, f"d{SCORE_NAMES[i]}")


# Every layout in fp32; bf16 (which changes only the kernels' loads and stores) on two. One
# image: several are tested below, with several tiles, D chunks and backward programs.
CASES = [(name, torch.float32) for name in SCAFFOLDS] + [
    (name, torch.bfloat16) for name in ("delaunay5x7", "qhull5x7")
]


@pytest.mark.usefixtures("tiles_of_32")
@pytest.mark.parametrize(("name", "dtype"), CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("with_p", [True, False])
def test_edge_scores_and_every_gradient(name, dtype, with_p):
    sc = _scaffold(name)
    gen = torch.Generator().manual_seed(0)
    _check_scores(sc, _score_inputs(gen, 1, sc.num_tokens, dtype, with_p), dtype, gen)


def _keeps(batch, mask, gen):
    return {
        "pruned": mask & (torch.rand((batch, *mask.shape), generator=gen).to(DEVICE) > 0.4),
        "dense": mask.expand(batch, *mask.shape),  # what topk_keep returns without pruning
    }


def _check_aggregate(sc, keep, inputs, dtype, gen):
    """Gated aggregate, gate means and every gradient against the float64 reference."""
    out, gate_mean = te.gated_aggregate(inputs[0], keep, *inputs[1:], sc)
    ref_inputs = _double(inputs)
    want_out, want_mean = edge.gated_aggregate(ref_inputs[0], keep, *ref_inputs[1:], sc)
    assert out.dtype == gate_mean.dtype == dtype
    _close(out, want_out, dtype, "out")
    _close(gate_mean, want_mean, dtype, "gate_mean")
    assert not gate_mean[~keep.expand_as(gate_mean)].any(), "a gate not kept is exactly 0"

    d_out = torch.randn(want_out.shape, generator=gen).to(DEVICE, dtype)
    d_mean = torch.randn(want_mean.shape, generator=gen).to(DEVICE, dtype)
    got_g = _grads([out, gate_mean], inputs, [d_out, d_mean])
    want_g = _grads([want_out, want_mean], ref_inputs, [d_out.double(), d_mean.double()])
    for what, g, w, x in zip(["ds", "dm", "dw_g", "db_g"], got_g, want_g, inputs):
        assert g.dtype == x.dtype
        _close(g, w, dtype, what)


@pytest.mark.usefixtures("tiles_of_32")
@pytest.mark.parametrize(("name", "dtype"), CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("keep_kind", ["pruned", "dense"])
def test_gated_aggregate_and_every_gradient(name, dtype, keep_kind):
    sc = _scaffold(name)
    gen = torch.Generator().manual_seed(1)
    keep = _keeps(1, sc.mask, gen)[keep_kind]
    s, m = (
        _leaf(gen, 1, sc.num_tokens, sc.max_degree, dtype=dtype),
        _leaf(gen, 1, sc.num_tokens, D, dtype=dtype),
    )
    w_g, b_g = _leaf(gen, D, dtype=dtype), _leaf(gen, D, dtype=dtype)
    _check_aggregate(sc, keep, [s, m, w_g, b_g], dtype, gen)


def test_padding_slots_are_never_kept():
    """keep set in padding slots too changes nothing: such a slot has no neighbour to gate."""
    sc = _scaffold("qhull5x7")
    gen = torch.Generator().manual_seed(5)
    s, m = (
        torch.randn(1, sc.num_tokens, sc.max_degree, generator=gen),
        torch.randn(1, sc.num_tokens, D, generator=gen),
    )
    w_g, b_g = torch.randn(D, generator=gen), torch.randn(D, generator=gen)
    s, m, w_g, b_g = (x.to(DEVICE) for x in (s, m, w_g, b_g))
    everywhere = te.gated_aggregate(s, torch.ones_like(sc.mask), m, w_g, b_g, sc)
    on_edges = te.gated_aggregate(s, sc.mask, m, w_g, b_g, sc)
    for got, want in zip(everywhere, on_edges):
        assert torch.equal(got, want)


def test_several_images_d_chunks_token_tiles_and_backward_programs(monkeypatch):
    """Two images; D = 9 in three chunks of 4 (the last ragged; the backward's weight
    partials hold four); tiles of 8 tokens, so N = 20 takes three; two backward programs
    per image, each looping over two tiles (the last past the grid); weight partials summed."""
    batch = 2
    knobs = dict(BLOCK_D=4, BWD_BLOCK_D=4, BLOCK_T=8, BWD_BLOCK_T=8, BWD_PROGRAMS=2 * batch)
    for knob, value in knobs.items():
        monkeypatch.setattr(te, knob, value)
    sc = scaffold.delaunay_grid(4, 5).to(DEVICE)
    n, d = sc.num_tokens, 9
    gen = torch.Generator().manual_seed(2)
    f32 = torch.float32
    _check_scores(sc, _score_inputs(gen, batch, n, f32, d=d), f32, gen)
    keep = _keeps(batch, sc.mask, gen)["pruned"]
    s, m = _leaf(gen, batch, n, sc.max_degree, dtype=f32), _leaf(gen, batch, n, d, dtype=f32)
    _check_aggregate(sc, keep, [s, m, _leaf(gen, d, dtype=f32), _leaf(gen, d, dtype=f32)], f32, gen)


def test_backend_selection(monkeypatch):
    grid = scaffold.delaunay_grid(3, 3)
    free = scaffold.delaunay(np.random.default_rng(0).random((9, 2)))  # no stencil
    for sc in (None, grid, free):
        assert select_edge_backend("auto", "cpu", sc).name != "triton"  # the interpreter is for tests
    assert te.why_not(torch.device("meta")) is not None
    if DEVICE == "cpu":
        assert select_edge_backend("triton", "cpu", grid).name == "triton"  # the interpreter is on
        with pytest.raises(RuntimeError, match="stencil"):
            select_edge_backend("triton", "cpu", free)
        monkeypatch.setattr(te, "INTERPRETED", False)
        with pytest.raises(RuntimeError, match="CUDA"):
            select_edge_backend("triton", "cpu", grid)
    else:
        assert select_edge_backend("triton", DEVICE, grid).name == "triton"
    x = torch.zeros(1, free.num_tokens, 2)
    with pytest.raises(ValueError, match="stencil"):
        te.edge_scores(x, x, x, x, x, None, None, x[0, 0], x[0, 0], x[0, 0, 0], free)


def _model_pair(**extra):
    from afmp.registry import create_model

    cfg = dict(img_size=16, patch_size=4, num_layers=2, d_model=12, k_dim=5, score_hidden=6, num_classes=7)
    torch.manual_seed(3)
    ref = create_model("afmp_tiny", backend="reference", **cfg, **extra).to(DEVICE)
    fast = create_model("afmp_tiny", backend="triton", **cfg, **extra).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


# The default grid (its buffers) and another (built on the fly), and a layout with a mask.
@pytest.mark.parametrize(("size", "layout"), [(16, "delaunay"), (20, "delaunay"), (16, "delaunay_qhull")])
def test_afmp_model_triton_matches_reference(size, layout):
    ref, fast = _model_pair(scaffold=layout)
    x = ref.example_input(batch_size=2, size=size)
    results = []
    for model in (ref, fast):
        logits, aux = model(x, return_aux=True)
        (logits.square().sum() + aux["sparsity_loss"] * 1e3).backward()
        results.append((logits, aux["sparsity_loss"], {n: p.grad for n, p in model.named_parameters()}))
    (l_ref, sp_ref, g_ref), (l_fast, sp_fast, g_fast) = results
    _close(l_fast, l_ref, torch.float32, "logits")
    _close(sp_fast, sp_ref, torch.float32, "sparsity loss")
    for n, g in g_ref.items():
        _close(g_fast[n], g, torch.float32, f"grad of {n}")


def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager runs the fake kernels and the autograd."""
    ref, fast = _model_pair()
    x = ref.example_input(batch_size=2)
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    ref(x).sum().backward()
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        _close(q.grad, p.grad, torch.float32, f"compiled grad of {n}")


@pytest.mark.parametrize("with_p", [True, False])
def test_opcheck(with_p):
    sc = scaffold.window(5, 1).to(DEVICE)  # two offsets: the interpreter runs the kernels often here
    grid = te.stencil_args(sc)
    n, kk = sc.mask.shape
    gen = torch.Generator().manual_seed(4)
    f32 = torch.float32
    q, k = _leaf(gen, 1, n, 3, dtype=f32), _leaf(gen, 1, n, 3, dtype=f32)
    a, b, h, p = (_leaf(gen, 1, n, 4, dtype=f32) for _ in range(4))
    w_err, w_len, w_out = (_leaf(gen, 4, dtype=f32) for _ in range(3))
    b_out = _leaf(gen, dtype=f32)
    if not with_p:
        p = w_err = None
    torch.library.opcheck(te.edge_scores_op, (q, k, a, b, h, p, w_err, w_len, w_out, b_out, *grid))
    s, keep = _leaf(gen, 1, n, kk, dtype=f32), sc.mask.expand(1, n, kk)
    torch.library.opcheck(te.gated_aggregate_op, (s, keep, h, w_len, w_out, *grid[:4]))


def test_edge_stage_bytes_and_bandwidth_helper(tmp_path, monkeypatch):
    from afmp.bench.edge import edge_stage_bandwidth, edge_stage_bytes

    # per token: 3 * (2*64 + 2*64 + 3*512) + 2*512 + 4*8 = 6432 elements of 2 bytes
    assert edge_stage_bytes(1, 1, 8, 512, 64, 64, 2) == 12864
    monkeypatch.setenv("AFMP_CACHE", str(tmp_path))  # the copy-bandwidth calibration's cache
    (row,) = edge_stage_bandwidth(2, (3, 4), 8, torch.float32, "cpu", ["reference"], repeats=1)
    assert row["backend"] == "reference" and row["tokens"] == 12 and row["bytes"] > 0
    assert row["fwd_bwd_ms"] > 0 and 0 < row["fraction_of_copy"] and row["copy_gb_per_s"] > 0
