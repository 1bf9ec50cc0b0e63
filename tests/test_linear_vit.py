"""The Linear-ViT family: token mixers against explicit forms, ripple pooling on literal grids,
the shared skeleton, training through afmp.train, and `afmp eval` / `afmp compare`."""

import csv
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import afmp
from afmp import cli
from afmp.evaluate import compare_runs, evaluate_checkpoint
from afmp.models.linear_attention import (
    HydraAttention,
    RippleAttention,
    hydra_bolya,
    merge_heads,
    ripple_pool,
    split_heads,
)
from afmp.ops.linear_attention import linear_attention_quadratic
from afmp.registry import resolve_config
from afmp.train import TrainConfig, train

FAMILIES = ["vit_baseline", "ripple_vit", "hydra_vit", "hydra_bolya_vit"]


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
    torch.manual_seed(0)
    dim, heads, branches = 8, 2, 3
    block = HydraAttention(dim, num_heads=heads, branches=branches, backend="reference").double()
    x = torch.randn(2, 9, dim, dtype=torch.float64)
    k, v = (split_heads(u, heads) for u in block.kv(x).chunk(2, dim=-1))
    outs = []
    for b, q in enumerate(block.q(x).chunk(branches, dim=-1)):  # branch b's own query projection
        outs.append(merge_heads(linear_attention_quadratic(split_heads(q, heads), k, v)))
        assert block.q.weight[b * dim : (b + 1) * dim].shape == (dim, dim)
    torch.testing.assert_close(block(x, (3, 3)), block.fuse(torch.cat(outs, -1)), rtol=1e-10, atol=1e-10)


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
    assert len(model.blocks) == 4 and model.blocks[0].attn.__class__.__name__.endswith("Attention")
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
    assert 0.0 <= results["test_accuracy"] <= 100.0
    assert (tmp_path / f"{family}_tiny" / "model.safetensors").is_file()


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
    # Bolya's Hydra mixes tokens in O(NC) instead of softmax attention's two N x N products.
    assert 0 < float(table["hydra_bolya_vit_tiny"]["GFLOPs"]) < float(table["vit_baseline_tiny"]["GFLOPs"])


def test_compare_needs_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        compare_runs([tmp_path])


def test_pooled_values_are_averages_not_sums():
    # The expansion reads pooled values: a constant grid stays constant through every stage.
    const = torch.full((1, 2, 36, 3), 0.75)
    for pooled, _ in ripple_pool(const, (6, 6), stages=3):
        torch.testing.assert_close(pooled, torch.full_like(pooled, 0.75))
    assert F.avg_pool2d(torch.ones(1, 1, 3, 3), 2, ceil_mode=True).flatten().tolist() == [1.0] * 4
