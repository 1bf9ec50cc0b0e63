"""AFMP's semantics and its per-token formulation (docs/model.md)."""

import dataclasses
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import afmp
from afmp import scaffold
from afmp.ops import EDGE_BACKENDS, select_edge_backend
from afmp.ops import edge as edge_ops
from afmp.ops.edge import topk_keep
from afmp.training.losses import auxiliary_loss


def per_edge_layer(layer, h, t, sc, sparsity):
    """One AFMP layer written edge by edge from the design's formulas, with the layer's weights."""
    D, Fh = layer.split[0], layer.split[4]
    W, bias = layer.proj.weight, layer.proj.bias
    W_self, W_msg, W_q, W_k, A, Bm = W.split(layer.split)
    b_self, b_msg, b_q, b_k, b_a, b_b = bias.split(layer.split)
    # v's first layer on [h_i, h_j, e_ij, len_ij] (its bias is the sum of the two halves').
    w_err = layer.w_err if layer.w_err is not None else torch.zeros(Fh, dtype=h.dtype)
    V1 = torch.cat([A, Bm, w_err[:, None], layer.w_len[:, None]], 1)
    b1 = b_a + b_b
    edges = [(i, int(j)) for i in range(sc.num_tokens) for j, ok in zip(sc.neighbors[i], sc.mask[i]) if ok]
    out = torch.empty_like(h)
    gate_means = []
    for b in range(h.shape[0]):
        scores = []
        for i, j in edges:
            hi, hj = h[b, i], h[b, j]
            e = torch.linalg.vector_norm(hj - layer.pred(t[b, i])) if t is not None else h.new_zeros(())
            bil = (W_q @ hi + b_q) @ layer.U @ (W_k @ hj + b_k)
            # The scaffold stores lengths in float32 (grid units).
            length = torch.tensor([math.dist(*map(tuple, pos[[i, j]]))], dtype=torch.float32).to(h.dtype)
            feat = torch.cat([hi, hj, e[None], length])
            scores.append(bil + layer.score_out(F.relu(V1 @ feat + b1))[0])
        scores = torch.stack(scores)
        n_keep = len(edges) - round(sparsity * len(edges))
        keep = torch.zeros(len(edges), dtype=torch.bool)
        keep[scores.topk(n_keep).indices] = True
        agg = torch.zeros(h.shape[1], D, dtype=h.dtype)
        gm = {}
        for (i, j), s, k in zip(edges, scores, keep):
            g = torch.sigmoid(layer.gate.weight[:, 0] * s + layer.gate.bias) * k
            agg[i] += g * (W_msg @ h[b, j] + b_msg)
            gm[(i, j)] = g.mean()
        out[b] = F.gelu(h[b] @ W_self.T + b_self + agg)
        gate_means.append(gm)
    return out, gate_means


pos = torch.tensor(scaffold.grid_positions(3, 4))


@pytest.mark.parametrize("with_prediction", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.3])
def test_per_token_formulation_equals_per_edge_computation(with_prediction, sparsity):
    torch.manual_seed(0)
    model = afmp.create_model(
        "afmp_tiny", img_size=12, patch_size=3, d_model=16, k_dim=8, score_hidden=8, sparsity=sparsity
    ).double()
    layer = model.layers[1 if with_prediction else 0]
    sc = scaffold.delaunay_grid(3, 4)
    h = torch.randn(2, 12, 16, dtype=torch.float64)
    t = torch.randn(2, 12, 16, dtype=torch.float64) if with_prediction else None
    with torch.no_grad():
        out, gate_mean = layer(h, t, sc, select_edge_backend("reference", "cpu"))
        expected, expected_gates = per_edge_layer(layer, h, t, sc, sparsity)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for b in range(2):
        for i in range(sc.num_tokens):
            for k in range(sc.max_degree):
                if sc.mask[i, k]:
                    ref = expected_gates[b][(i, int(sc.neighbors[i, k]))]
                    assert gate_mean[b, i, k].item() == pytest.approx(ref.item(), abs=1e-12)
                else:
                    assert gate_mean[b, i, k].item() == 0.0


@pytest.mark.parametrize("with_prediction", [False, True])
def test_layer_of_puts_the_reference_halves_together_as_the_per_edge_layer(with_prediction):
    """edge.layer_of around the reference's two halves is the per-edge layer (per_edge_layer):
    projections, scores, per-image top-k at sparsity 0.3, gated sum, gelu(W_self h + agg).
    The layer is built here, not taken from the registry, whose layers are made at import."""
    torch.manual_seed(0)
    model = afmp.create_model(
        "afmp_tiny", img_size=12, patch_size=3, d_model=16, k_dim=8, score_hidden=8, sparsity=0.3
    ).double()
    layer = model.layers[1 if with_prediction else 0]
    sc = scaffold.delaunay_grid(3, 4)
    h = torch.randn(2, 12, 16, dtype=torch.float64)
    t = torch.randn(2, 12, 16, dtype=torch.float64) if with_prediction else None
    run = edge_ops.layer_of(edge_ops.edge_scores, edge_ops.gated_aggregate)
    with torch.no_grad():
        out, gate_mean = run(h, t, layer.weights(), sc, 0.3)
        expected, expected_gates = per_edge_layer(layer, h, t, sc, 0.3)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for b in range(2):
        for i in range(sc.num_tokens):
            for k in range(sc.max_degree):
                want = expected_gates[b][(i, int(sc.neighbors[i, k]))].item() if sc.mask[i, k] else 0.0
                assert gate_mean[b, i, k].item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("sparsity", [0.0, 0.3])
def test_batch_independence_in_eval_mode(sparsity):
    torch.manual_seed(0)
    model = afmp.create_model("afmp_tiny", num_classes=5, sparsity=sparsity).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
        reordered = model(x.flip(0)).flip(0)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together, reordered, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparsity", [0.2, 0.3, 0.6])
def test_exactly_rho_of_each_images_edges_are_pruned(sparsity):
    torch.manual_seed(0)
    model = afmp.create_model("afmp_tiny", img_size=48, sparsity=sparsity)  # 6x6 tokens
    _, aux = model(torch.randn(3, 3, 48, 48), return_aux=True)
    mask = model.edge_mask
    num_edges = int(mask.sum())
    for gates in aux["gates"]:
        assert gates.shape == (3, 36, mask.shape[1])
        assert bool((gates[:, ~mask] == 0).all())  # padding slots carry nothing
        for b in range(3):
            pruned = int((gates[b][mask] == 0).sum())
            assert pruned == round(sparsity * num_edges)
            assert bool((gates[b][mask][gates[b][mask] != 0] > 0).all())


def test_dense_variant_keeps_every_edge_and_has_no_regulariser():
    model = afmp.create_model("afmp_tiny_dense")
    _, aux = model(torch.randn(2, 3, 32, 32), return_aux=True)
    assert all(bool((g[:, model.edge_mask] > 0).all()) for g in aux["gates"])
    assert aux["sparsity_loss"].item() == 0.0


class DispatchedOps(TorchDispatchMode):
    """The names of the aten ops dispatched inside ``with DispatchedOps() as ops``."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("name", "topk_calls"), [("afmp_tiny_dense", 0), ("afmp_tiny", 4)])
def test_only_the_sparse_variant_runs_top_k(name, topk_calls):
    model = afmp.create_model(name)
    x = torch.randn(2, 3, 32, 32)
    with DispatchedOps() as ops:
        logits, aux = model(x, return_aux=True)
        (logits.sum() + aux["sparsity_loss"]).backward()
    assert ops.names.count("topk") == topk_calls  # one per layer when pruning; none when dense
    if not topk_calls:  # nor anything else of the pruning
        assert not {"sort", "kthvalue", "scatter", "scatter_"} & set(ops.names)


def test_sparsity_loss_is_lambda_times_mean_gate():
    model = afmp.create_model("afmp_tiny", lambda_sparse=0.5)
    logits, aux = model(torch.randn(2, 3, 32, 32), return_aux=True)
    valid = model.edge_mask
    mean_gate = torch.stack([g[:, valid].mean() for g in aux["gates"]]).mean()
    assert aux["sparsity_loss"].item() == pytest.approx(0.5 * mean_gate.item(), rel=1e-5)
    # The loss contract (afmp.training.losses): the same term, the only one, is what training adds.
    assert list(aux["losses"]) == ["sparsity"] and aux["losses"]["sparsity"] is aux["sparsity_loss"]
    assert auxiliary_loss(aux, logits).item() == aux["sparsity_loss"].item()


def test_top_down_changes_the_logits_and_learns():
    torch.manual_seed(0)
    with_td = afmp.create_model("afmp_tiny", num_classes=4).eval()
    without = afmp.create_model("afmp_tiny", num_classes=4, use_top_down=False).eval()
    missing, unexpected = without.load_state_dict(with_td.state_dict(), strict=False)
    assert not missing and all(k.startswith("top_down.") for k in unexpected)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(with_td(x), without(x), atol=1e-4)
    with_td.train()
    logits, aux = with_td(x, return_aux=True)
    (logits.square().sum() + aux["sparsity_loss"]).backward()
    for name, p in with_td.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_top_down_refines_each_level_by_the_refined_level_above():
    """s_2 stays, s_1 <- s_1 + W_1 s_2, s_0 <- s_0 + W_0 s_1 (refined), and the readout takes s_0;
    without top-down it takes the top level s_2. The bottom-up levels come from the same weights
    with top-down off."""
    torch.manual_seed(0)
    opts = dict(num_classes=4, num_layers=3, d_model=16, k_dim=8, score_hidden=8, backend="reference")
    with_td = afmp.create_model("afmp_tiny", **opts).double().eval()
    without = afmp.create_model("afmp_tiny", use_top_down=False, **opts).double().eval()
    without.load_state_dict(with_td.state_dict(), strict=False)
    with torch.no_grad():
        for p in with_td.top_down.parameters():  # of the order of the states, so they matter
            p.normal_(0.0, 0.5)
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        bottom_up, aux = without.forward_features(x, return_aux=True)
        s0, s1, s2 = aux["states"]
        torch.testing.assert_close(bottom_up, s2)
        td = with_td.top_down
        refined1 = s1 + td[1](s2)
        expected = s0 + td[0](refined1)
        torch.testing.assert_close(with_td.forward_features(x), expected, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(expected, s0, atol=1e-3)


def test_topk_keeps_exactly_k_edges_per_image_whatever_the_other_images_score():
    mask = torch.tensor([[True, True], [True, False], [True, True]])  # 5 real edges, 1 padding slot
    s = torch.tensor(
        [
            [[0.5, 0.1], [0.9, 7.0], [0.3, -1.0]],  # 7.0 is on the padding slot
            [[5.0, 4.0], [3.0, 0.0], [2.0, 1.0]],
        ]
    )
    # 40% of 5 edges pruned: the 3 best real edges of each image stay.
    expected = torch.tensor(
        [
            [[True, False], [True, False], [True, False]],
            [[True, True], [True, False], [False, False]],
        ]
    )
    assert torch.equal(topk_keep(s, mask, 5, 0.4), expected)
    # Image 1 scoring far lower (or higher) changes nothing in image 0.
    for other in (s[1] - 100.0, s[1] + 100.0):
        keep = topk_keep(torch.stack([s[0], other]), mask, 5, 0.4)
        assert torch.equal(keep[0], expected[0]) and torch.equal(keep[1], expected[1])
    assert torch.equal(topk_keep(s, mask, 5, 0.0), mask.expand(2, 3, 2))  # dense: every real edge


def test_dense_topk_keeps_every_real_edge_without_running_any_pruning_op():
    """Sparsity 0 is the mask itself, for a shared scaffold (int count) and per-example ones
    (a tensor of counts): no topk, sort or scatter runs, whatever the scores."""
    mask = torch.tensor([[True, False], [True, True]])
    s = torch.tensor([[[0.1, 9.0], [-3.0, 2.0]], [[4.0, 4.0], [0.5, -0.5]]])
    per_example = mask.expand(2, 2, 2)
    with DispatchedOps() as ops:
        shared_keep = topk_keep(s, mask, 3, 0.0)
        own_keep = topk_keep(s, per_example, torch.tensor([3, 3]), 0.0)
    expected = [[[True, False], [True, True]], [[True, False], [True, True]]]
    assert shared_keep.tolist() == expected and own_keep.tolist() == expected
    assert not {"topk", "sort", "argsort", "kthvalue", "scatter", "scatter_"} & set(ops.names)


def test_the_same_weights_run_at_another_resolution():
    model = afmp.create_model("afmp_tiny", num_classes=10)
    bigger = afmp.create_model("afmp_tiny", num_classes=10, img_size=64)
    bigger.load_state_dict(model.state_dict())  # strict: no resolution-dependent weights
    assert bigger(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert model(torch.randn(2, 3, 48, 40)).shape == (2, 10)  # other grids are built on the fly


def test_a_one_token_image_in_float64_is_the_self_path_the_top_down_pass_and_the_head():
    """A 16-pixel model (2x2 grid) on 8x8 images: a 1x1 grid, built on the fly, with no edges.
    Every gate is 0, so layer l is gelu(W_self h + b_self); the top-down pass and the readout
    follow, written out here in float64 (the centre of a 1x1 grid is (0.5, 0.5)); the
    sparsity loss is 0."""
    torch.manual_seed(0)
    model = afmp.create_model(
        "afmp_tiny",
        img_size=16,
        patch_size=8,
        in_chans=1,
        d_model=4,
        k_dim=2,
        score_hidden=2,
        num_layers=3,
        num_classes=3,
        sparsity=0.3,
    ).double()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorm's scale and shift too
            p.normal_(0.0, 0.5)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    logits, aux = model(x, return_aux=True)
    assert logits.dtype == torch.float64 and aux["grid"] == (1, 1)

    def gelu(z):
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))

    with torch.no_grad():
        conv = model.patch_embed.proj
        h = x.flatten(1) @ conv.weight.flatten(1).T + conv.bias  # one 8x8 patch per image
        centre = torch.tensor([0.5, 0.5], dtype=torch.float64)
        h = h + centre @ model.pos_embed.weight.T + model.pos_embed.bias
        levels = []
        for layer in model.layers:
            h = gelu(h @ layer.proj.weight[:4].T + layer.proj.bias[:4])
            levels.append(h)
        levels[1] = levels[1] + levels[2] @ model.top_down[1].weight.T + model.top_down[1].bias
        levels[0] = levels[0] + levels[1] @ model.top_down[0].weight.T + model.top_down[0].bias
        z = levels[0]
        normed = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
        normed = normed * model.norm.weight + model.norm.bias
        expected = normed @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-12)
    assert aux["sparsity_loss"].item() == 0.0
    assert all(g.shape == (2, 1, 6) and not g.any() for g in aux["gates"])


def test_forward_head_pools_normalises_and_classifies_unless_asked_not_to():
    """forward_head: LayerNorm of the token mean, then the head; ``pre_logits`` stops before the
    head; with global_pool "" every token is normalised and classified on its own. Written
    out in float64 on literal-sized random features."""
    torch.manual_seed(0)
    model = afmp.create_model("afmp_tiny", d_model=4, num_layers=1, num_classes=3).double()
    with torch.no_grad():
        for p in (*model.norm.parameters(), *model.head.parameters()):
            p.normal_(0.0, 0.5)
    features = torch.randn(2, 5, 4, dtype=torch.float64)

    def norm(z):
        z = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
        return z * model.norm.weight + model.norm.bias

    def head(z):
        return z @ model.head.weight.T + model.head.bias

    with torch.no_grad():
        pooled = norm(features.mean(1))
        torch.testing.assert_close(
            model.forward_head(features, pre_logits=True), pooled, rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(model.forward_head(features), head(pooled), rtol=1e-12, atol=1e-12)
        model.reset_classifier(3, global_pool="")
        torch.testing.assert_close(model.forward_head(features), head(norm(features)), rtol=1e-12, atol=1e-12)


def test_auto_in_the_model_sees_the_grid_and_runs_the_stencil_from_10x10_tokens(monkeypatch):
    """The model hands its scaffold to ``auto``: on the CPU a 10x10 token grid runs the stencil
    backend (once per layer), an 8x8 one does not (docs/results.md's measured order)."""
    stencil, calls = EDGE_BACKENDS["stencil"], []

    def layer(*args):
        calls.append(1)
        return stencil.layer(*args)

    monkeypatch.setitem(EDGE_BACKENDS, "stencil", dataclasses.replace(stencil, layer=layer))
    model = afmp.create_model(
        "afmp_tiny", img_size=20, patch_size=2, d_model=8, k_dim=4, score_hidden=4, num_layers=2
    )
    with torch.no_grad():
        model(torch.randn(1, 3, 20, 20))  # the default grid, 10x10
        assert len(calls) == 2
        model(torch.randn(1, 3, 16, 16))  # 8x8: below the stencil's size
        assert len(calls) == 2
        model(torch.randn(1, 3, 24, 22))  # 12x11, built on the fly
        assert len(calls) == 4


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.randn(2, 1, 32, 32), "expected 3 input channel"),
        (torch.randn(2, 3, 30, 32), "divisible by the patch size 8"),
        (torch.full((2, 3, 32, 32), float("nan")), "finite"),
        (torch.randn(3, 32, 32), r"shape \(B, 3, H, W\)"),
    ],
)
def test_bad_inputs_raise_a_clear_value_error(x, message):
    with pytest.raises(ValueError, match=message):
        afmp.create_model("afmp_tiny")(x)


def test_unknown_names_and_options_list_the_valid_ones():
    with pytest.raises(ValueError, match="registered models: .*afmp_tiny"):
        afmp.create_model("afmp_huge")
    with pytest.raises(ValueError, match="valid options: .*sparsity"):
        afmp.create_model("afmp_tiny", sparsty=0.3)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        afmp.create_model("afmp_tiny", sparsity=1.5)


def test_presets_and_timm_registry():
    tiny = afmp.create_model("afmp_tiny")
    assert (tiny.cfg.num_layers, tiny.cfg.d_model, tiny.cfg.patch_size, tiny.cfg.img_size) == (4, 128, 8, 32)
    assert (tiny.cfg.sparsity, tiny.cfg.lambda_sparse) == (0.3, 1e-4)
    small = afmp.create_model("afmp_small")
    assert (small.cfg.num_layers, small.cfg.d_model, small.cfg.patch_size, small.cfg.img_size) == (
        5,
        512,
        16,
        224,
    )
    assert 5.5e6 < sum(p.numel() for p in small.parameters()) < 6.5e6  # the notebook's ~6.1M
    model = timm.create_model("afmp_tiny", num_classes=7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("afmp_tiny", pretrained=True)


def test_forward_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = afmp.create_model("afmp_tiny", num_classes=10).eval()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_forward_intermediates_gives_each_level_as_a_map():
    torch.manual_seed(0)
    model = afmp.create_model("afmp_tiny", img_size=32, patch_size=8, num_layers=3, d_model=16).eval()
    x = model.example_input(batch_size=2)
    with torch.no_grad():
        features, aux = model.forward_features(x, return_aux=True)
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, features)
        assert [tuple(m.shape) for m in maps] == [(2, 16, 4, 4)] * 3
        # Token (row 1, column 2) of level 2 is map position [:, :, 1, 2] (row-major tokens).
        torch.testing.assert_close(maps[2][:, :, 1, 2], aux["states"][2][:, 1 * 4 + 2])
        last = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
        assert len(last) == 1
        torch.testing.assert_close(last[0], aux["states"][2])
    with pytest.raises(ValueError, match="indices must be levels in \\[0, 3\\)"):
        model.forward_intermediates(x, indices=[3])
