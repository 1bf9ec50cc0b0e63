"""Triton kernels of the per-edge stage against the plain-PyTorch reference.

On a machine without a GPU these run through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so sizes stay tiny. Every gradient is checked: the kernels'
backward is hand-written (reverse neighbour lists, recomputed gates), the
reference's is autograd's. The reference runs in float64 on the same values, so a
tolerance only has to cover the kernels' own rounding (fp32 accumulation, bf16
inputs and outputs).
"""

import pytest
import torch

from afmp import scaffold
from afmp.ops import edge, select_edge_backend

te = pytest.importorskip("afmp.ops.triton_edge")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # max error / max |reference|
SCAFFOLDS = {
    # N=35 (no multiple of a block), K=8; and K=6 (two lanes of padding in the tile, slots at the ends).
    "delaunay5x7": lambda: scaffold.delaunay_grid(5, 7),
    "window9r3": lambda: scaffold.window(9, 3),
}
B, R, F, D = 2, 5, 6, 11


def _leaf(gen, *shape, dtype):
    return torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_()


def _close(got, want, dtype, what):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item() + 1e-12
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} against max |ref| {scale:.3g}"


def _grads(outputs, inputs, cotangents):
    grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _graph(name):
    sc = SCAFFOLDS[name]().to(DEVICE)
    return sc.neighbors, sc.mask, sc.length, sc.reverse


@pytest.mark.parametrize("name", list(SCAFFOLDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_p", [True, False])
def test_edge_scores_and_every_gradient(name, dtype, with_p):
    nbr, _, length, reverse = _graph(name)
    n = nbr.shape[0]
    gen = torch.Generator().manual_seed(0)
    q, k = _leaf(gen, B, n, R, dtype=dtype), _leaf(gen, B, n, R, dtype=dtype)
    a, b = _leaf(gen, B, n, F, dtype=dtype), _leaf(gen, B, n, F, dtype=dtype)
    h = _leaf(gen, B, n, D, dtype=dtype)
    p = _leaf(gen, B, n, D, dtype=dtype) if with_p else None
    w_err = _leaf(gen, F, dtype=dtype) if with_p else None
    w_len, w_out, b_out = _leaf(gen, F, dtype=dtype), _leaf(gen, F, dtype=dtype), _leaf(gen, dtype=dtype)
    inputs = [q, k, a, b, h, p, w_err, w_len, w_out, b_out]
    names = ["q", "k", "a", "b", "h", "p", "w_err", "w_len", "w_out", "b_out"]

    got = te.edge_scores(*inputs, nbr, length, reverse)
    ref_inputs = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    want = edge.edge_scores(*ref_inputs, nbr, length.double())
    assert got.shape == want.shape == (B, n, nbr.shape[1]) and got.dtype == dtype
    _close(got, want, dtype, "s")

    ds = torch.randn(want.shape, generator=gen).to(DEVICE, dtype)
    live = [i for i, x in enumerate(inputs) if x is not None]
    got_g = _grads(got, [inputs[i] for i in live], ds)
    want_g = _grads(want, [ref_inputs[i] for i in live], ds.double())
    for i, g, w in zip(live, got_g, want_g):
        assert g.dtype == inputs[i].dtype
        if names[i] == "h" and not with_p:
            assert not g.any(), "h enters only through the prediction error"
        else:
            _close(g, w, dtype, f"d{names[i]}")


def _keeps(mask, gen):
    pruned = mask & (torch.rand((B, *mask.shape), generator=gen).to(DEVICE) > 0.4)
    return {
        "pruned": pruned,
        "dense_expanded": mask.expand(B, *mask.shape),
        "all_slots": torch.ones_like(pruned),
    }


@pytest.mark.parametrize("name", list(SCAFFOLDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep_kind", ["pruned", "dense_expanded", "all_slots"])
def test_gated_aggregate_and_every_gradient(name, dtype, keep_kind):
    nbr, mask, _, reverse = _graph(name)
    n = nbr.shape[0]
    gen = torch.Generator().manual_seed(1)
    keep = _keeps(mask, gen)[keep_kind]  # all_slots also sends gradients through padding slots
    s, m = _leaf(gen, B, n, nbr.shape[1], dtype=dtype), _leaf(gen, B, n, D, dtype=dtype)
    w_g, b_g = _leaf(gen, D, dtype=dtype), _leaf(gen, D, dtype=dtype)
    inputs = [s, m, w_g, b_g]

    out, gate_mean = te.gated_aggregate(s, keep, m, w_g, b_g, nbr, reverse)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    r_s, r_m, r_wg, r_bg = ref_inputs
    want_out, want_mean = edge.gated_aggregate(r_s, keep, r_m, r_wg, r_bg, nbr)
    assert out.dtype == gate_mean.dtype == dtype
    _close(out, want_out, dtype, "out")
    _close(gate_mean, want_mean, dtype, "gate_mean")
    assert not gate_mean[~keep.expand_as(gate_mean)].any(), "a pruned edge's gate is exactly 0"

    d_out = torch.randn(want_out.shape, generator=gen).to(DEVICE, dtype)
    d_mean = torch.randn(want_mean.shape, generator=gen).to(DEVICE, dtype)
    got_g = _grads([out, gate_mean], inputs, [d_out, d_mean])
    want_g = _grads([want_out, want_mean], ref_inputs, [d_out.double(), d_mean.double()])
    for what, g, w in zip(["ds", "dm", "dw_g", "db_g"], got_g, want_g):
        _close(g, w, dtype, what)


def test_backward_with_several_token_blocks_per_program(monkeypatch):
    """One program per image loops over all token blocks (and sums the weight partials)."""
    monkeypatch.setattr(te, "BWD_PROGRAMS", 1)
    nbr, mask, length, reverse = _graph("delaunay5x7")
    n = nbr.shape[0]
    gen = torch.Generator().manual_seed(2)
    f32 = torch.float32
    xs = [_leaf(gen, B, n, c, dtype=f32) for c in (R, R, F, F, D, D)] + [
        _leaf(gen, F, dtype=f32) for _ in range(3)
    ]
    xs.append(_leaf(gen, dtype=f32))
    m, w_g, b_g = (
        _leaf(gen, B, n, 2 * D, dtype=f32),
        _leaf(gen, 2 * D, dtype=f32),
        _leaf(gen, 2 * D, dtype=f32),
    )
    keep = _keeps(mask, gen)["pruned"]

    def stage(fns, args, rev):
        s = fns.edge_scores(*args[:10], nbr, length, *rev)
        return fns.gated_aggregate(s, keep, m, w_g, b_g, nbr, *rev)

    leaves = [*xs, m, w_g, b_g]
    got = _grads(sum(o.square().sum() for o in stage(te, xs, [reverse])), leaves, None)
    want = _grads(sum(o.square().sum() for o in stage(edge, xs, [])), leaves, None)
    for i, (g, w) in enumerate(zip(got, want)):
        _close(g, w, torch.float32, f"input {i}")


@pytest.mark.parametrize("name", list(SCAFFOLDS))
def test_reverse_slots_recomputed_from_the_lists(name):
    sc = SCAFFOLDS[name]()
    rev = te.reverse_slots(sc.neighbors)
    assert torch.equal(rev[sc.mask], sc.reverse[sc.mask])
    one_way = sc.neighbors.clone()
    one_way[0, 0] = 5 if sc.neighbors[0, 0] != 5 else 6  # 0 <- 5 without 5 <- 0
    with pytest.raises(ValueError, match="symmetric"):
        te.reverse_slots(one_way)


def test_backend_selection(monkeypatch):
    assert select_edge_backend("auto", "cpu").name == "packed"  # the interpreter is for tests only
    assert te.why_not(torch.device("meta")) is not None
    if DEVICE == "cpu":
        assert select_edge_backend("triton", "cpu").name == "triton"  # the interpreter is on
        monkeypatch.setattr(te, "INTERPRETED", False)
        with pytest.raises(RuntimeError, match="CUDA"):
            select_edge_backend("triton", "cpu")
    else:
        assert select_edge_backend("auto", DEVICE).name == "triton"


def _model_pair():
    from afmp.registry import create_model

    cfg = dict(img_size=16, patch_size=4, num_layers=3, d_model=12, k_dim=5, score_hidden=6, num_classes=7)
    torch.manual_seed(3)
    ref = create_model("afmp_tiny", backend="reference", **cfg).to(DEVICE)
    fast = create_model("afmp_tiny", backend="triton", **cfg).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("size", [16, 20])  # the default grid (buffers) and another (built on the fly)
def test_afmp_model_triton_matches_reference(size):
    ref, fast = _model_pair()
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


def test_opcheck():
    nbr, mask, length, reverse = _graph("window9r3")
    n, kk = nbr.shape
    gen = torch.Generator().manual_seed(4)
    f32 = torch.float32
    q, k = _leaf(gen, 1, n, 3, dtype=f32), _leaf(gen, 1, n, 3, dtype=f32)
    a, b, h, p = (_leaf(gen, 1, n, 4, dtype=f32) for _ in range(4))
    w_err, w_len, w_out, b_out = (
        _leaf(gen, 4, dtype=f32),
        _leaf(gen, 4, dtype=f32),
        _leaf(gen, 4, dtype=f32),
        _leaf(gen, dtype=f32),
    )
    torch.library.opcheck(
        te.edge_scores_op, (q, k, a, b, h, p, w_err, w_len, w_out, b_out, nbr, length, reverse)
    )
    s, keep = _leaf(gen, 1, n, kk, dtype=f32), mask.expand(1, n, kk)
    torch.library.opcheck(te.gated_aggregate_op, (s, keep, h, w_len, w_out, nbr, reverse))


def test_edge_stage_bytes_and_bandwidth_helper(tmp_path, monkeypatch):
    from afmp.ops.edge_bench import edge_stage_bandwidth, edge_stage_bytes

    # per token: 3 * (2*64 + 2*64 + 3*512) + 2*512 + 4*8 = 6432 elements of 2 bytes
    assert edge_stage_bytes(1, 1, 8, 512, 64, 64, 2) == 12864
    monkeypatch.setenv("AFMP_CACHE", str(tmp_path))  # the copy-bandwidth calibration's cache
    (row,) = edge_stage_bandwidth(2, (3, 4), 8, torch.float32, "cpu", ["reference"], repeats=1)
    assert row["backend"] == "reference" and row["tokens"] == 12 and row["bytes"] > 0
    assert row["fwd_bwd_ms"] > 0 and 0 < row["fraction_of_copy"] and row["copy_gb_per_s"] > 0
