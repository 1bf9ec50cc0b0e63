"""The Linear-ViT family: token mixers against explicit forms, ripple pooling on literal grids,
the shared skeleton, training through afmp.training, and `afmp eval` / `afmp compare`."""

import csv
import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import afmp
import afmp_cli as cli
from afmp.commands.compare import compare_runs
from afmp.commands.evaluate import evaluate_checkpoint
from afmp.data import build_dataset
from afmp.models.linear_attention import (
    BolyaHydraAttention,
    HydraAttention,
    RippleAttention,
    SoftmaxAttention,
    hydra_bolya,
    merge_heads,
    ripple_pool,
    split_heads,
)
from afmp.ops.linear_attention import linear_attention_quadratic
from afmp.registry import resolve_config
from afmp.training.train import TrainConfig, train

FAMILIES = ["vit_baseline", "ripple_vit", "hydra_vit", "hydra_bolya_vit"]
# What each family's name promises: Config.attention and the token mixer's class.
KINDS = {
    "vit_baseline": ("softmax", SoftmaxAttention),
    "ripple_vit": ("ripple", RippleAttention),
    "hydra_vit": ("hydra", HydraAttention),
    "hydra_bolya_vit": ("hydra_bolya", BolyaHydraAttention),
}


# -- ripple pooling on literal grids ----------------------------------------------------------
def test_ripple_pool_4x4_literal():
    tokens = torch.arange(16.0).view(1, 16, 1)  # row-major 4x4 grid of the values 0..15
    stages = ripple_pool(tokens, (4, 4), stages=5)  # stops once the grid is 1x1
    assert [grid for _, grid in stages] == [(2, 2), (1, 1)]
    assert stages[0][0].flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert stages[1][0].flatten().tolist() == [7.5]


def test_ripple_pool_odd_grid_and_leading_dims():
    # 3x3 grid 0..8: ceil-mode windows {0,1,3,4} {2,5} {6,7} {8}, then one window of those four.
    tokens = torch.arange(9.0).view(1, 1, 9, 1).repeat(2, 3, 1, 2)  # (B, H, N, D)
    stages = ripple_pool(tokens, (3, 3), stages=2)
    assert stages[0][0].shape == (2, 3, 4, 2) and stages[0][1] == (2, 2)
    assert stages[0][0][1, 2, :, 1].tolist() == [2.0, 3.5, 6.5, 8.0]
    assert stages[1][0][0, 0, :, 0].tolist() == [5.0]
    with pytest.raises(ValueError, match="grid tokens"):
        ripple_pool(tokens, (4, 4), stages=1)


# -- mixers against their explicit forms (float64) --------------------------------------------
def test_bolya_hydra_equals_explicit_per_channel_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    # One head per channel c: an N x N matrix A_c[i, n] = q^_ic k^_nc, out_ic = sum_n A_c[i, n] v_nc.
    scores = torch.einsum("bic,bnc->bcin", qn, kn)
    explicit = torch.einsum("bcin,bnc->bic", scores, v)
    torch.testing.assert_close(hydra_bolya(q, k, v), explicit, rtol=1e-12, atol=1e-12)


def test_ripple_attention_equals_explicit_pyramid_attention():
    torch.manual_seed(0)
    dim, heads, grid = 8, 2, (4, 4)
    block = RippleAttention(dim, num_heads=heads, stages=2, backend="reference").double()
    x = torch.randn(2, 1 + 16, dim, dtype=torch.float64)
    out = block(x, grid)

    q, k, v = (split_heads(u, heads) for u in block.qkv(x).chunk(3, dim=-1))

    def pyramid(t):  # class token, then the 2x2 means of the 4x4 grid, then the grid mean
        patches = t[:, :, 1:].reshape(2, heads, 2, 2, 2, 2, dim // heads)  # (B, H, by, y, bx, x, D)
        blocks = patches.mean(dim=(3, 5)).flatten(2, 3)
        return torch.cat([t[:, :, :1], blocks, patches.mean(dim=(2, 3, 4, 5)).unsqueeze(2)], dim=2)

    attended = merge_heads(linear_attention_quadratic(q, pyramid(k), pyramid(v)))
    v_blocks = merge_heads(pyramid(v)[:, :, 1:5]).transpose(1, 2).reshape(2, dim, 2, 2)
    ripple = (
        block.expand(v_blocks.repeat_interleave(2, -1).repeat_interleave(2, -2)).flatten(2).transpose(1, 2)
    )
    expected = block.proj(torch.cat([attended[:, :1], attended[:, 1:] + ripple], dim=1))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_hydra_attention_equals_branches_with_shared_kv():
    """Away from the preset: three branches of rank 2 (the formula is _hydra_formula, below)."""
    torch.manual_seed(0)
    block = HydraAttention(8, num_heads=2, branches=3, rank=2, backend="reference").double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.5)
        x = torch.randn(2, 9, 8, dtype=torch.float64)
        expected = _hydra_formula(block, x, (3, 3))
        torch.testing.assert_close(block(x, (3, 3)), expected, rtol=1e-10, atol=1e-12)
        # The branches differ: with one branch's own term alone, the output changes.
        block.up[1:].zero_()
        assert not torch.allclose(block(x, (3, 3)), expected, atol=1e-3)


# -- each preset's mixer computes its family's formula (written here by hand, float64) -----------
def _affine(x, layer):
    return x @ layer.weight.T + layer.bias


def _heads(t, heads):  # (B, T, H * Dh) -> (B, H, T, Dh): head h is channels h * Dh to (h + 1) * Dh
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


def _merge(t):  # (B, H, T, Dh) -> (B, T, H * Dh)
    b, h, n, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, n, h * d)


def _linear_attention(q, k, v, eps=1e-6):
    """phi(q_i) . phi(k_j) weights, normalised per query, phi(x) = [max(x, 0), max(-x, 0)]."""

    def phi(x):
        return torch.cat([x.clamp(min=0), (-x).clamp(min=0)], dim=-1)

    kernel = phi(q) @ phi(k).transpose(-2, -1)  # (B, H, N, M)
    return kernel @ v / (kernel.sum(-1, keepdim=True) + eps)


def _softmax_formula(attn, x, grid):
    """proj(concat_h softmax(Q_h K_h^T / sqrt(Dh)) V_h)."""
    q, k, v = (_heads(t, attn.num_heads) for t in _affine(x, attn.qkv).chunk(3, -1))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return _affine(_merge(weights @ v), attn.proj)


def _ripple_formula(attn, x, grid):
    """On a 4x4 grid: queries attend (linearly) to the class token, the four 2x2 block means and
    the grid mean of K and V; grid tokens also get a depthwise 3x3 conv of the block means of V
    repeated to 4x4."""
    assert grid == (4, 4)
    b, _, c = x.shape
    q, k, v = (_heads(t, attn.num_heads) for t in _affine(x, attn.qkv).chunk(3, -1))

    def pyramid(t):  # (B, H, 1 + 16, Dh) -> (B, H, 1 + 4 + 1, Dh)
        g = t[:, :, 1:].reshape(*t.shape[:2], 4, 4, t.shape[-1])
        blocks = [g[:, :, r : r + 2, s : s + 2].mean((2, 3)) for r in (0, 2) for s in (0, 2)]
        return torch.stack([t[:, :, 0], *blocks, g.mean((2, 3))], dim=2)

    out = _merge(_linear_attention(q, pyramid(k), pyramid(v)))
    means = _merge(pyramid(v)[:, :, 1:5]).reshape(b, 2, 2, c)
    up = means.repeat_interleave(2, 1).repeat_interleave(2, 2)  # nearest: each mean on its 2x2 block
    padded = F.pad(up, (0, 0, 1, 1, 1, 1))  # zeros around the 4x4 grid
    w = attn.expand.weight[:, 0]  # (C, 3, 3), one filter per channel
    conv = attn.expand.bias + sum(
        padded[:, dy : dy + 4, dx : dx + 4] * w[:, dy, dx] for dy in range(3) for dx in range(3)
    )
    out = out + torch.cat([torch.zeros_like(out[:, :1]), conv.reshape(b, 16, c)], dim=1)
    return _affine(out, attn.proj)


def _hydra_formula(attn, x, grid, eps=1e-6):
    """Branch r's queries are the shared ones plus a rank-R term of its own, q_r = W_q x + b_q +
    U_r V_r x (V_r: rows r*R..(r+1)*R of ``down``, U_r = ``up[r]``); each branch and head attends
    linearly to the shared K/V heads; the branches' mean is projected."""
    heads, rank = attn.num_heads, attn.rank
    q, k, v = _affine(x, attn.qkv).chunk(3, -1)
    k, v = _heads(k, heads), _heads(v, heads)
    low = x @ attn.down.weight.T  # (B, T, branches * R), no bias
    outs = [
        _merge(
            _linear_attention(_heads(q + low[..., r * rank : (r + 1) * rank] @ attn.up[r], heads), k, v, eps)
        )
        for r in range(attn.branches)
    ]
    return _affine(sum(outs) / attn.branches, attn.proj)


def _hydra_bolya_formula(attn, x, grid):
    """proj(q^ * sum_n k^_n * v_n), q^ and k^ of unit length per token."""
    q, k, v = _affine(x, attn.qkv).chunk(3, -1)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    return _affine(q * (k * v).sum(dim=1, keepdim=True), attn.proj)


FORMULAS = {
    "vit_baseline": _softmax_formula,
    "ripple_vit": _ripple_formula,
    "hydra_vit": _hydra_formula,
    "hydra_bolya_vit": _hydra_bolya_formula,
}


def _ripple_by_hand(attn, x, grid, pool, finest_of, eps):
    """RippleAttention on a small grid, from literal pooling weights: row m of ``pool`` (M, gh*gw)
    averages grid tokens into pooled key/value m (the finest stage's rows first); grid token n
    reads the finest pooled value ``finest_of[n]`` (nearest upsampling), through the depthwise
    3x3 conv (zero padding); the prefix tokens are attended as they are."""
    gh, gw = grid
    b, t, c = x.shape
    prefix = t - gh * gw
    pool = torch.tensor(pool, dtype=x.dtype)
    q, k, v = (_heads(u, attn.num_heads) for u in _affine(x, attn.qkv).chunk(3, -1))
    keys = torch.cat([k[:, :, :prefix], pool @ k[:, :, prefix:]], dim=2)
    values = torch.cat([v[:, :, :prefix], pool @ v[:, :, prefix:]], dim=2)
    out = _merge(_linear_attention(q, keys, values, eps))
    pooled_v = _merge(pool @ v[:, :, prefix:])  # (B, M, C)
    up = pooled_v[:, finest_of].reshape(b, gh, gw, c)
    padded = F.pad(up, (0, 0, 1, 1, 1, 1))
    w = attn.expand.weight[:, 0]  # (C, 3, 3)
    conv = attn.expand.bias + sum(
        padded[:, dy : dy + gh, dx : dx + gw] * w[:, dy, dx] for dy in range(3) for dx in range(3)
    )
    out = out + torch.cat([torch.zeros_like(out[:, :prefix]), conv.reshape(b, gh * gw, c)], dim=1)
    return _affine(out, attn.proj)


def _random_block(block):
    block = block.double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.5)
    return block


def test_ripple_attention_on_a_2x3_grid_without_prefix_tokens():
    """A 2x3 grid, no class token, eps 2 (it weighs in the normaliser): stage 1 pools the
    windows {0, 1, 3, 4} and {2, 5} (ceil mode), stage 2 averages those two means; the
    expansion reads stage 1 upsampled by nearest (columns 0, 1 from the first window)."""
    torch.manual_seed(0)
    block = _random_block(RippleAttention(4, num_heads=2, stages=3, backend="reference", eps=2.0))
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    pool = [
        [0.25, 0.25, 0.0, 0.25, 0.25, 0.0],
        [0.0, 0.0, 0.5, 0.0, 0.0, 0.5],
        [0.125, 0.125, 0.25, 0.125, 0.125, 0.25],
    ]
    with torch.no_grad():
        expected = _ripple_by_hand(block, x, (2, 3), pool, [0, 0, 1, 0, 0, 1], eps=2.0)
        torch.testing.assert_close(block(x, (2, 3)), expected, rtol=1e-10, atol=1e-12)


def test_ripple_attention_on_a_1x1_grid_attends_to_its_token_as_it_is():
    """A 1x1 grid has nothing to pool: the queries attend to the class token and the grid
    token, and the expansion is the conv's centre tap on that token (eps 2)."""
    torch.manual_seed(0)
    block = _random_block(RippleAttention(4, num_heads=2, stages=3, backend="reference", eps=2.0))
    x = torch.randn(2, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = _ripple_by_hand(block, x, (1, 1), [[1.0]], [0], eps=2.0)
        torch.testing.assert_close(block(x, (1, 1)), expected, rtol=1e-10, atol=1e-12)


def test_hydra_attention_passes_its_eps_to_linear_attention():
    """eps 2 in HydraAttention is eps 2 in every branch's normaliser (_hydra_formula)."""
    torch.manual_seed(0)
    block = _random_block(HydraAttention(8, num_heads=2, branches=3, rank=2, backend="reference", eps=2.0))
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = _hydra_formula(block, x, (3, 3), eps=2.0)
        torch.testing.assert_close(block(x, (3, 3)), expected, rtol=1e-10, atol=1e-12)


def test_a_mixers_linear_attention_backend_is_the_one_it_was_given(monkeypatch):
    """An explicit backend that cannot run here is refused with its reason, never replaced by
    auto's choice: "triton" on CPU tensors without Triton's interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 4, 4)
    for block in (
        HydraAttention(4, num_heads=2, branches=2, rank=1, backend="triton"),
        RippleAttention(4, num_heads=2, backend="triton"),
    ):
        with pytest.raises(RuntimeError, match="linear-attention backend 'triton' cannot run here"):
            block(x, (2, 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_presets_mixer_is_the_kind_its_name_says(family):
    attention, mixer = KINDS[family]
    for size in ("tiny", "cifar", "tin"):
        assert resolve_config(f"{family}_{size}").attention == attention
    model = afmp.create_model(f"{family}_tiny")
    assert all(type(block.attn) is mixer for block in model.blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_presets_mixer_computes_its_familys_formula(family):
    torch.manual_seed(0)
    model = afmp.create_model(f"{family}_tiny", img_size=16, embed_dim=8, num_heads=2, depth=1).double()
    attn = model.blocks[0].attn
    with torch.no_grad():
        for p in attn.parameters():  # weights and biases all of order 1, none left at 0
            p.normal_(0.0, 0.5)
        x = torch.randn(2, 1 + 16, 8, dtype=torch.float64)  # class token + a 4x4 grid
        expected = FORMULAS[family](attn, x, (4, 4))
        torch.testing.assert_close(attn(x, (4, 4)), expected, rtol=1e-10, atol=1e-12)


# -- the skeleton -------------------------------------------------------------------------------
def test_family_presets_are_registered_in_both_registries():
    import timm

    for family in FAMILIES:
        for size in ("tiny", "cifar", "tin"):
            assert f"{family}_{size}" in afmp.list_models()
    assert resolve_config("ripple_vit_cifar").embed_dim == 384
    assert resolve_config("hydra_vit_tin").num_classes == 200
    model = timm.create_model("hydra_bolya_vit_tiny", num_classes=7)
    assert model(model.example_input()).shape == (2, 7)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_shares_the_skeleton_and_resamples_positions(family):
    torch.manual_seed(0)
    model = afmp.create_model(f"{family}_tiny").eval()
    assert len(model.blocks) == 4 and all(type(b.attn) is KINDS[family][1] for b in model.blocks)
    assert model(model.example_input(size=48)).shape == (2, 100)  # 12x12 grid, pos embed resampled
    x = model.example_input(size=32)
    torch.testing.assert_close(model._pos_embed((8, 8)), model.pos_embed)
    features = model.forward_features(x)
    assert features.shape == (2, 1 + 64, 128)


def test_config_errors_say_what_was_expected():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        afmp.create_model("vit_baseline_tiny", num_heads=5)
    with pytest.raises(ValueError, match="attention must be one of"):
        afmp.create_model("vit_baseline_tiny", attention="flash")
    with pytest.raises(ValueError, match="backend must be one of"):
        afmp.create_model("ripple_vit_tiny", backend="cuda")


# -- training, eval, compare -------------------------------------------------------------------
def _train(tmp_path, model, **kw):
    cfg = TrainConfig(
        model=model,
        dataset="synthetic",
        data_opts={"num_samples": 64, "img_size": 32},
        out=str(tmp_path / model),
        epochs=1,
        batch_size=16,
        **kw,
    )
    return train(cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_through_afmp_train(tmp_path, family):
    results = _train(tmp_path, f"{family}_tiny", label_smoothing=0.1, mixup_alpha=0.2)
    history = results["training_history"]
    assert len(history["train_loss"]) == 1 and np.isfinite(history["train_loss"][0])
    run = tmp_path / f"{family}_tiny"
    # Every weight moved from where the seed put it: gradients reached every parameter.
    spec = json.loads((run / "last.json").read_text())
    torch.manual_seed(0)  # train seeds with cfg.seed (0) before it builds the model
    initial = afmp.create_model(spec["model"], **spec["config"]).state_dict()
    trained = load_file(str(run / "last.safetensors"))
    assert trained.keys() == initial.keys()
    assert [k for k in trained if torch.equal(trained[k], initial[k])] == []
    # The reported test accuracy is that of the saved weights on the test split.
    test = build_dataset("synthetic", val_fraction=0.1, num_samples=64, img_size=32).test
    assert len(test) == 13  # one batch of the 16 afmp train evaluates in
    with torch.no_grad():
        predicted = afmp.load_checkpoint(run).eval()(test.images).argmax(-1)
    assert results["test_accuracy"] == pytest.approx(100.0 * int((predicted == test.labels).sum()) / 13)


def test_mixup_rejects_negative_alpha(tmp_path):
    with pytest.raises(ValueError, match="mixup_alpha"):
        _train(tmp_path, "vit_baseline_tiny", mixup_alpha=-1.0)


def _write_cifar10(root, per_batch=4, n_test=8):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n):
        return {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist(),
        }

    for b in range(1, 6):
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(batch(per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))


def test_trains_on_cifar_format_files(tmp_path):
    _write_cifar10(tmp_path / "data")
    cfg = TrainConfig(
        model="ripple_vit_tiny", dataset="cifar10", data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"),
        epochs=1, batch_size=8, val_fraction=0.2, model_opts={"depth": 2},
    )  # fmt: skip
    results = train(cfg)
    assert results["config"]["resolved_model"]["config"]["num_classes"] == 10
    report = evaluate_checkpoint(tmp_path / "run")
    assert report["samples"] == 8 and len(report["per_class"]) == 10
    assert report["per_class"][3]["name"] == "class3"


def test_eval_and_compare_write_their_files(tmp_path, capsys):
    for model in ("vit_baseline_tiny", "hydra_bolya_vit_tiny"):
        _train(tmp_path, model, model_opts={"depth": 2})  # the files, not the model, are under test
    run = tmp_path / "vit_baseline_tiny"
    assert cli.main(["eval", "--checkpoint", str(run), "--split", "test"]) == 0
    report = json.loads((run / "per_class_test.json").read_text())
    confusion = torch.tensor(report["confusion"])
    assert confusion.shape == (10, 10) and int(confusion.sum()) == report["samples"] == 13  # 20% of 64
    with (run / "per_class_test.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["support"]) for r in rows] == confusion.sum(1).tolist()
    assert report["accuracy"] == pytest.approx(100.0 * int(confusion.diag().sum()) / 13)
    assert (run / "confusion_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = tmp_path / "cmp"
    runs = [str(tmp_path / m) for m in ("vit_baseline_tiny", "hydra_bolya_vit_tiny")]
    assert cli.main(["compare", "--runs", *runs, "--out", str(out), "--warmup", "1", "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| vit_baseline_tiny |" in printed and (out / "compare.md").read_text() in printed
    with (out / "compare.csv").open() as f:
        table = {r["model"]: r for r in csv.DictReader(f)}
    results = json.loads((tmp_path / "vit_baseline_tiny" / "results.json").read_text())
    assert float(table["vit_baseline_tiny"]["test_acc"]) == results["test_accuracy"]
    assert float(table["vit_baseline_tiny"]["latency_ms"]) > 0
    # Rows are labelled by model, data set and seed, not by folder name alone.
    assert sorted(table[m]["run"] for m in table) == [
        "hydra_bolya_vit_tiny-synthetic-seed0",
        "vit_baseline_tiny-synthetic-seed0",
    ]
    # Bolya's Hydra mixes tokens in O(NC) instead of softmax attention's two N x N products.
    assert (
        0
        < float(table["hydra_bolya_vit_tiny"]["total_gflops"])
        < float(table["vit_baseline_tiny"]["total_gflops"])
    )


def test_compare_needs_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        compare_runs([tmp_path])


def test_pooled_values_are_averages_not_sums():
    # The expansion reads pooled values: a constant grid stays constant through every stage.
    const = torch.full((1, 2, 36, 3), 0.75)
    for pooled, _ in ripple_pool(const, (6, 6), stages=3):
        torch.testing.assert_close(pooled, torch.full_like(pooled, 0.75))
    assert F.avg_pool2d(torch.ones(1, 1, 3, 3), 2, ceil_mode=True).flatten().tolist() == [1.0] * 4
