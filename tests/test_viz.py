"""Gate figures: statistics with literal values, PNGs from the training hook and from `afmp viz`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import afmp_cli as cli
from afmp import create_model
from afmp.commands import viz
from afmp.commands.train import epoch_hook
from afmp.training.train import TrainConfig, train

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, d_model=16, k_dim=8, score_hidden=8)


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG


def test_graph_edges_average_both_directions():
    # Chain 0 - 1 - 2; padding slots point at the token itself and carry junk gates.
    nbr = np.array([[1, 0], [0, 2], [1, 1]])
    mask = np.array([[True, False], [True, True], [True, False]])
    gates = np.array([[0.2, 9.0], [0.4, 0.6], [0.8, 9.0]])
    i, j, g = viz.graph_edges(gates, nbr, mask)
    assert i.tolist() == [0, 1] and j.tolist() == [1, 2]
    np.testing.assert_allclose(g, [0.3, 0.7])


def test_layer_sparsity_counts_pruned_edges_exactly():
    torch.manual_seed(0)
    model = create_model("afmp_tiny", sparsity=0.3, num_layers=3, **SMALL)
    gates, nbr, mask, grid = viz.collect_gates(model, torch.randn(5, 1, 8, 8))
    assert grid == (4, 4) and int(mask.sum()) == 66  # 4x4 Delaunay grid: 33 edges, both directions
    assert len(gates) == 3 and gates[0].shape == (5, 16, nbr.shape[1])
    stats = viz.layer_sparsity(gates, mask)
    for s in stats:  # per image, round(0.3 * 66) = 20 edges are cut: their gate is exactly 0
        assert s["zero"] == 20 / 66
        assert s["zero"] <= s["below_half"] <= 1
    dense = create_model("afmp_tiny", sparsity=0.0, **SMALL)
    gates, _, mask, _ = viz.collect_gates(dense, torch.randn(2, 1, 8, 8))
    assert all(s["zero"] == 0 for s in viz.layer_sparsity(gates, mask))


def test_render_writes_pngs(tmp_path):
    model = create_model("afmp_tiny", **SMALL)
    written = viz.render(model, torch.randn(3, 1, 8, 8), tmp_path, "t", mean=(0.5,), std=(0.2,), graphs=2)
    names = sorted(p.name for p in written)
    assert names == ["gates_t.png", "graph_t_img0.png", "graph_t_img1.png", "sparsity_t.png"]
    assert all(_is_png(p) for p in written)
    stats = json.loads((tmp_path / "sparsity_t.json").read_text())
    assert stats["images"] == 3 and len(stats["layers"]) == model.cfg.num_layers


def test_model_without_gates_is_refused(tmp_path):
    class Plain(torch.nn.Module):
        def forward(self, x, return_aux=False):
            return x.mean((1, 2, 3)), {}

    with pytest.raises(ValueError, match="no gates"):
        viz.collect_gates(Plain(), torch.randn(1, 1, 8, 8))
    assert viz.epoch_hook(Plain(), None, tmp_path, 1) == []  # the training hook skips it instead
    assert not (tmp_path / "viz").exists()


def test_afmp_viz_on_a_text_run_is_one_line(tmp_path, capsys):
    from afmp import save_checkpoint

    save_checkpoint(create_model("diffusion_text", num_classes=4), tmp_path / "text")
    argv = ["viz", "--checkpoint", str(tmp_path / "text"), "--dataset", "digits"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("afmp viz: error: ") and "holds a diffusion_text model" in err
    assert "Traceback" not in err and not (tmp_path / "text" / "viz").exists()


def test_training_hook_and_afmp_viz(tmp_path, capsys):
    out = tmp_path / "run"
    opts = {k: SMALL[k] for k in ("d_model", "k_dim", "score_hidden")}
    cfg = TrainConfig(dataset="digits", epochs=3, viz_every=2, out=str(out), model_opts=opts)
    train(cfg, on_epoch=epoch_hook(cfg))  # what `afmp train --viz-every 2` passes
    # Every 2 epochs, and after the last one.
    written = sorted(p.name for p in (out / "viz").glob("*.png"))
    assert written == [
        f"{kind}_epoch{e:03d}{suffix}.png"
        for kind, suffix in [("gates", ""), ("graph", "_img0"), ("sparsity", "")]
        for e in (2, 3)
    ]

    # afmp viz on the trained checkpoint, from image files and from a data set.
    image = tmp_path / "digit.png"
    Image.fromarray((np.eye(16) * 255).astype(np.uint8)).save(image)
    assert (
        cli.main(["viz", "--checkpoint", str(out), "--images", str(image), "--out", str(tmp_path / "a")]) == 0
    )
    assert _is_png(tmp_path / "a" / "graph_model_img0.png")
    assert (
        cli.main(["viz", "--checkpoint", str(out), "--dataset", "digits", "--num", "2", "--stem", "last"])
        == 0
    )
    assert _is_png(out / "viz" / "graph_last_img1.png") and _is_png(out / "viz" / "gates_last.png")
    capsys.readouterr()
    assert cli.main(["viz", "--checkpoint", str(out)]) == 2
    assert "--images" in capsys.readouterr().err
