import dataclasses
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import afmp
import afmp_cli as cli
from afmp.data import build_dataset
from afmp.registry import model_args_for_data
from afmp.training.config import config_from_args
from afmp.training.ema import WeightEMA
from afmp.training.epoch import make_scheduler
from afmp.training.rundir import sha256_file
from afmp.training.train import TrainConfig, train


def accuracy(model, split, batch_size) -> float:
    """Top-1 accuracy (%) of ``model`` on ``split``, in the batches afmp train evaluates in."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for inputs, labels in DataLoader(split, batch_size=batch_size):
            correct += int((model(inputs).argmax(-1) == labels).sum())
    return 100.0 * correct / len(split)


TINY = dict(dataset="synthetic", data_opts={"num_samples": 96, "img_size": 16}, batch_size=16, lr=3e-3)


def test_train_writes_results_weights_and_config(tmp_path):
    results = train(TrainConfig(model="afmp_tiny", epochs=2, out=str(tmp_path), **TINY))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["test_accuracy"] == results["test_accuracy"]
    for key in (
        "model",
        "dataset",
        "config",
        "params",
        "best_val_accuracy",
        "test_accuracy",
        "peak_memory_mb",
        "training_history",
    ):
        assert key in on_disk
    history = on_disk["training_history"]
    assert set(history) == {
        "train_loss",
        "train_acc",
        "val_acc",
        "sparsity_loss",
        "time",
        "images_per_s",
        "mfu",
    }
    assert all(len(v) == 2 for v in history.values())
    # Peak memory on the CPU is the process's high-water RSS in MiB (ru_maxrss is in KiB on Linux).
    assert on_disk["peak_memory_source"] == "process_max_rss"
    assert 0 < on_disk["peak_memory_mb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert (tmp_path / "config.yaml").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # atomic writes leave nothing behind
    # The best weights rebuild from the directory alone, with the data's shape (16x16 -> patch 4).
    model = afmp.load_checkpoint(tmp_path)
    assert model.cfg.img_size == 16 and model.cfg.patch_size == 4 and model.cfg.num_classes == 10
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # The reported test accuracy is that of the saved weights on the test split.
    test = build_dataset("synthetic", val_fraction=0.1, seed=0, **TINY["data_opts"]).test
    assert on_disk["test_accuracy"] == pytest.approx(accuracy(model, test, TINY["batch_size"]))


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    straight = tmp_path / "straight"
    train(TrainConfig(model="afmp_tiny", epochs=3, out=str(straight), **TINY))
    broken = tmp_path / "broken"
    train(TrainConfig(model="afmp_tiny", epochs=1, out=str(broken), **TINY))
    train(TrainConfig(model="afmp_tiny", epochs=3, out=str(broken), resume=True, **TINY))
    a, b = load_file(str(straight / "last.safetensors")), load_file(str(broken / "last.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    ha = json.loads((straight / "results.json").read_text())["training_history"]
    hb = json.loads((broken / "results.json").read_text())["training_history"]
    assert ha["val_acc"] == hb["val_acc"] and ha["train_loss"] == pytest.approx(hb["train_loss"])


def test_resume_refuses_a_run_saved_with_another_model(tmp_path):
    """A run saved before checkpoint format 2 has Qhull's scaffold: resuming it as today's
    "delaunay" would train another model, so it stops and says what to pass."""
    train(TrainConfig(model="afmp_tiny", epochs=1, out=str(tmp_path), **TINY))
    folder = tmp_path / "checkpoints" / "epoch-0000"
    spec = json.loads((folder / "last.json").read_text())
    del spec["format"]  # as the code before format 2 wrote it
    (folder / "last.json").write_text(json.dumps(spec))
    manifest = json.loads((folder / "manifest.json").read_text())  # a consistent checkpoint still
    manifest["files"]["last.json"] = sha256_file(folder / "last.json")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="scaffold='delaunay_qhull' \\(now 'delaunay'\\)"):
        train(TrainConfig(model="afmp_tiny", epochs=2, out=str(tmp_path), resume=True, **TINY))
    opts = {"scaffold": "delaunay_qhull"}
    train(TrainConfig(model="afmp_tiny", epochs=2, out=str(tmp_path), resume=True, model_opts=opts, **TINY))
    assert len(json.loads((tmp_path / "results.json").read_text())["training_history"]["val_acc"]) == 2


def test_patch_size_keeps_the_presets_token_grid():
    digits = {"img_size": 8, "in_chans": 1, "num_classes": 10}
    assert model_args_for_data("afmp_tiny", digits, {}) == {**digits, "patch_size": 2}
    assert model_args_for_data("afmp_tiny", digits, {"patch_size": 4})["patch_size"] == 4


def test_cli_yaml_config_and_model_options(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: afmp_tiny\ndataset: synthetic\nepochs: 5\nmodel_opts: {sparsity: 0.5}\n"
        "data_opts: {num_samples: 48, img_size: 16}\nbatch_size: 16\n"
    )
    out = tmp_path / "run"
    code = cli.main(
        ["train", "--config", str(config), "--epochs", "1", "--out", str(out), "-o", "use_top_down=false"]
    )
    assert code == 0
    spec = json.loads((out / "model.json").read_text())
    assert spec["config"]["sparsity"] == 0.5 and spec["config"]["use_top_down"] is False
    assert json.loads((out / "results.json").read_text())["config"]["epochs"] == 1


def test_threads_are_set_and_recorded_with_the_load(tmp_path):
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        results = train(TrainConfig(model="afmp_tiny", epochs=1, out=str(tmp_path), threads=want, **TINY))
        assert torch.get_num_threads() == want
        machine = results["config"]["machine"]
        assert machine["threads"] == want and machine["cpus"] == os.cpu_count()
        assert machine["load_1min"] == pytest.approx(os.getloadavg()[0], abs=2.0)
        # The run's own config.yaml is a valid --config: the recorded machine is not a setting.
        argv = ["train", "--config", str(tmp_path / "config.yaml")]
        assert config_from_args(cli.build_parser(argv).parse_args(argv)).threads == want
    finally:
        torch.set_num_threads(before)


def test_shipped_digits_config_is_the_no_argument_job():
    """The shipped afmp_tiny_digits.yaml documents `afmp train` with no arguments: same settings."""
    config = Path(afmp.__file__).parent / "configs" / "afmp_tiny_digits.yaml"

    def parse(argv):
        return config_from_args(cli.build_parser(argv).parse_args(argv))

    from_yaml, no_args = parse(["train", "--config", str(config)]), parse(["train"])
    assert parse(["train", "--config", "afmp_tiny_digits"]) == from_yaml  # by its shipped name
    with pytest.raises(ValueError, match="not a shipped config \\(afmp_tiny_digits\\)"):
        parse(["train", "--config", "nothing_here"])
    preset = afmp.create_model("afmp_tiny").cfg
    assert {k: getattr(preset, k) for k in from_yaml.model_opts} == from_yaml.model_opts
    from_yaml.model_opts = {}
    assert from_yaml == no_args


def test_afmp_help_imports_neither_torch_nor_timm():
    # `afmp --help` is the console script's parser alone; torch and timm take seconds to import.
    code = "import sys, afmp_cli; afmp_cli.build_parser([]).format_help(); print(sorted({'torch', 'timm', 'afmp'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_key_value_options_read_yaml_values_and_name_the_flag():
    from afmp.utils.options import parse_key_values

    got = parse_key_values(["sparsity=0.5", "use_top_down=false", "name= a=b", "sizes=[1, 2]", "s=x"])
    assert got == {"sparsity": 0.5, "use_top_down": False, "name": "a=b", "sizes": [1, 2], "s": "x"}
    assert parse_key_values(None) == {}
    with pytest.raises(ValueError, match=r"^--data-opt expects KEY=VALUE \(e.g. n=1\), got 'oops'$"):
        parse_key_values(["oops"], flag="--data-opt", example="n=1")
    with pytest.raises(ValueError, match="expects KEY=VALUE"):
        parse_key_values(["=3"])
    with pytest.raises(ValueError, match="'a=\\[1': the value is not valid YAML"):
        parse_key_values(["a=[1"])


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert cli.main(["train", "--model", "nope", "--out", str(tmp_path)]) == 2
    assert "registered models" in capsys.readouterr().err
    assert cli.main(["train", "-o", "sparsity", "--out", str(tmp_path)]) == 2
    assert "-o/--model-opt expects KEY=VALUE (e.g. sparsity=0.5), got 'sparsity'" in capsys.readouterr().err
    assert (
        cli.main(["bench", "--models", "afmp_tiny@backend", "--device", "cpu", "--out", str(tmp_path)]) == 2
    )
    assert "model spec 'afmp_tiny@backend' expects KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["models"]) == 0
    assert "afmp_tiny" in capsys.readouterr().out


def test_weight_ema_is_the_running_average_of_the_weights():
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.75)
    expected = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        expected = [0.75 * e + 0.25 * p.detach() for e, p in zip(expected, model.parameters())]
    for e, got in zip(expected, ema.module.parameters()):
        torch.testing.assert_close(got, e)
        assert not got.requires_grad
    for decay in (0.0, 1.0):  # 0 is the config's "off", never an EMA that copies the weights
        with pytest.raises(ValueError, match="EMA decay must be in"):
            WeightEMA(model, decay=decay)


def test_train_with_ema_saves_the_average_and_resumes_exactly(tmp_path):
    opts = dict(model="afmp_tiny", ema_decay=0.9, **TINY)
    straight = tmp_path / "straight"
    results = train(TrainConfig(epochs=3, out=str(straight), **opts))
    broken = tmp_path / "broken"
    train(TrainConfig(epochs=1, out=str(broken), **opts))
    train(TrainConfig(epochs=3, out=str(broken), resume=True, **opts))
    hb = json.loads((broken / "results.json").read_text())
    assert hb["training_history"]["val_acc"] == results["training_history"]["val_acc"]
    assert hb["test_accuracy"] == results["test_accuracy"]
    # model.safetensors holds the average, last.safetensors the raw weights (for --resume).
    best, last = load_file(str(straight / "model.safetensors")), load_file(str(straight / "last.safetensors"))
    assert any(not torch.equal(best[k], last[k]) for k in best)


def test_equal_validation_accuracy_keeps_the_later_epoch(tmp_path):
    # With lr 0 the weights never change, so every epoch ties on validation.
    cfg = TrainConfig(
        model="afmp_tiny", epochs=3, out=str(tmp_path), select="best_val", **{**TINY, "lr": 0.0}
    )
    results = train(cfg)
    assert len(set(results["training_history"]["val_acc"])) == 1
    assert results["best_epoch"] == results["selected_epoch"] == 3
    assert json.loads((tmp_path / "model.json").read_text())["epoch"] == 2  # 0-based, as saved


def test_select_chooses_the_weights_that_are_tested_and_saved(tmp_path):
    runs = {}
    for select in ("last", "best_val"):
        out = tmp_path / select
        runs[select] = train(TrainConfig(model="afmp_tiny", epochs=4, out=str(out), select=select, **TINY))
        best, last = load_file(str(out / "model.safetensors")), load_file(str(out / "last.safetensors"))
        same = all(torch.equal(best[k], last[k]) for k in best)
        history = runs[select]["training_history"]["val_acc"]
        assert runs[select]["val_accuracy"] == history[runs[select]["selected_epoch"] - 1]
        if select == "last":
            assert same and runs[select]["selected_epoch"] == 4
        else:
            assert runs[select]["selected_epoch"] == runs[select]["best_epoch"]
            assert max(history) == history[runs[select]["best_epoch"] - 1]
            assert same == (runs[select]["best_epoch"] == 4)
    with pytest.raises(ValueError, match="select must be last or best_val, got .best."):
        train(TrainConfig(out=str(tmp_path / "bad"), select="best"))


# -- learning and the schedule -------------------------------------------------------------------
LEARN = dict(
    model="afmp_tiny",
    dataset="synthetic",
    data_opts={"num_samples": 320, "img_size": 16},  # 224 train / 32 val / 64 test images
    model_opts={"d_model": 32, "num_layers": 2, "k_dim": 16, "score_hidden": 16},
    batch_size=16,  # 14 steps an epoch
    epochs=6,
    lr=1e-2,
    warmup_epochs=0.5,
    weight_decay=0.0,
    label_smoothing=0.0,  # the loss can then fall towards 0, not to smoothing's floor
)


@pytest.mark.usefixtures("one_thread")
def test_training_learns_the_synthetic_set(tmp_path):
    """Two seconds of training take a small AFMP from chance (loss ln 10 = 2.30, 10% accuracy) to
    a loss under 0.25 and 90% test accuracy: fails without the optimizer step, without the
    backward pass, or with a learning rate stuck at 0."""
    results = train(TrainConfig(out=str(tmp_path), **LEARN))
    losses = results["training_history"]["train_loss"]
    assert losses[0] > 1.5  # the first epoch starts at chance
    assert losses[-1] < 0.25 and losses[-1] < losses[0] / 8
    assert results["test_accuracy"] >= 90.0
    # The optimizer stepped once per batch, and the cosine schedule ended at 0.
    state = torch.load(tmp_path / "checkpoints" / "epoch-0005" / "state.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 6 * 14
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {6 * 14}
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)


def _learning_rates(cfg: TrainConfig, steps_per_epoch: int, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_schedule_warms_up_linearly_then_follows_the_half_cosine_to_zero():
    """The learning rate at each step, computed by hand (the rate of step s is the one its update uses)."""
    # 4 steps an epoch, 2 epochs: warm-up over steps 0-3 (lr/4, 2lr/4, 3lr/4, lr), then
    # lr * (1 + cos(pi * s / 4)) / 2 for s = 0..4 steps after it: 1, (2 + sqrt 2)/4, 1/2,
    # (2 - sqrt 2)/4, 0; past the end it stays at 0.
    cfg = TrainConfig(lr=0.4, epochs=2, warmup_epochs=1.0, scheduler="cosine")
    expected = [0.1, 0.2, 0.3, 0.4, 0.4, 0.34142135623730950, 0.2, 0.05857864376269050, 0.0, 0.0]
    assert _learning_rates(cfg, 4, 10) == pytest.approx(expected, abs=1e-12)
    # No warm-up asked: one step of it (the full rate at once), then the cosine over 3 steps.
    # cos(0), cos(pi/3), cos(2pi/3), cos(pi) -> factors 1, 3/4, 1/4, 0.
    cfg = TrainConfig(lr=0.4, epochs=1, warmup_epochs=0.0, scheduler="cosine")
    assert _learning_rates(cfg, 4, 5) == pytest.approx([0.4, 0.4, 0.3, 0.1, 0.0], abs=1e-12)


def test_cosine_schedule_whose_warm_up_fills_the_run_still_ends_at_zero():
    """Warm-up as long as the whole run (3 steps of 3): the cosine still gets one step, so the
    rate reaches the full value and then 0, with no division by a zero-length decay."""
    cfg = TrainConfig(lr=0.3, epochs=1, warmup_epochs=1.0, scheduler="cosine")
    assert _learning_rates(cfg, 3, 6) == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.0, 0.0], abs=1e-12)


def test_plateau_schedule_cuts_the_rate_by_five_after_six_epochs_without_a_better_validation():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(TrainConfig(scheduler="plateau"), optimizer, 4)
    rates = []
    for val_acc in (50.0, 60.0, 60.0, 59.0, 60.0, 55.0, 60.0, 60.0, 61.0):
        scheduler.step(val_acc)  # higher is better
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([1.0] * 7 + [0.2, 0.2])


def test_weight_decay_on_weights_spares_norms_biases_and_embeddings():
    from afmp.training.epoch import param_groups

    for name, decayed, spared in [
        ("vit_baseline_tiny", ["patch_embed.proj.weight", "blocks.0.attn.qkv.weight"],
         ["pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"]),
        ("afmp_tiny", ["patch_embed.proj.weight", "layers.0.proj.weight", "layers.0.U"], ["pos_embed.weight", "pos_embed.bias"]),
        ("diffusion_text", [], ["embed.weight"]),
    ]:  # fmt: skip
        model = afmp.create_model(name)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = param_groups(model, 0.05, "weights")
        assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
        on, off = ({names[id(p)] for p in g["params"]} for g in groups)
        assert set(decayed) <= on and set(spared) <= off, name
        assert sorted(on | off) == sorted(names.values()) and not on & off  # each parameter once
        (everything,) = param_groups(model, 0.05, "all")
        assert everything["weight_decay"] == 0.05 and len(everything["params"]) == len(names)


def test_flops_per_training_image_is_linear_and_leaves_no_trace():
    from afmp.measure.counting import count
    from afmp.training.epoch import flops_per_train_image

    torch.manual_seed(0)
    model = afmp.create_model("convnet_resnet10t", img_size=16, num_classes=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def make_batch(b):
        return torch.randn(b, 3, 16, 16), torch.randint(0, 3, (b,))

    per_image = flops_per_train_image(model, make_batch)

    def counted(b):
        x, y = make_batch(b)
        model.eval()
        total = count(lambda: torch.nn.functional.cross_entropy(model(x), y).backward()).total_flops
        model.zero_grad(set_to_none=True)
        return total

    assert per_image == pytest.approx((counted(7) - counted(2)) / 5, rel=1e-9)
    model.train()
    # Counted in eval mode with the gradients cleared: BatchNorm's statistics did not move.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())


def test_epoch_reports_throughput_and_mfu_against_the_measured_peak(tmp_path, monkeypatch):
    from afmp.measure import roofline
    from afmp.training.epoch import flops_per_train_image

    monkeypatch.setenv("AFMP_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(model="afmp_tiny", epochs=1, out=str(tmp_path / "a"), **TINY)
    history = train(cfg)["training_history"]
    assert history["images_per_s"][0] > 0 and history["mfu"] == [None]  # no calibration: no MFU
    with open(tmp_path / "a" / "history.csv") as f:
        assert f.read().splitlines()[1].endswith(",")  # an empty cell, not "None"
    # With a calibration (here a made-up peak of 1e9 FLOP/s), MFU = FLOPs per image x images/s / peak.
    key = roofline._cache_key(torch.device("cpu"), torch.float32)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "roofline.json").write_text(json.dumps({key: {"peak_flops_per_s": 1e9}}))
    history = train(dataclasses.replace(cfg, out=str(tmp_path / "b")))["training_history"]
    model = afmp.load_checkpoint(tmp_path / "b")
    flops = flops_per_train_image(model, lambda b: (torch.randn(b, 3, 16, 16), torch.randint(0, 10, (b,))))
    assert history["mfu"][0] == pytest.approx(flops * history["images_per_s"][0] / 1e9, rel=1e-6)


def test_compile_trains_through_the_compiled_module_and_saves_the_plain_one(tmp_path, monkeypatch):
    # torch.compile with its "eager" backend: the same numbers as without, so the wiring is what
    # is tested (steps through the compiled wrapper, weights saved from the module under it).
    calls = []
    real_compile = torch.compile

    def spy(model, **kwargs):
        calls.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", spy)
    cfg = TrainConfig(model="afmp_tiny", epochs=2, out=str(tmp_path / "eager"), **TINY)
    plain = train(cfg)
    torch._dynamo.reset()
    compiled = train(dataclasses.replace(cfg, out=str(tmp_path / "compiled"), compile=True))
    assert len(calls) == 1 and type(calls[0]).__name__ == "AFMP"
    assert compiled["training_history"]["train_loss"] == pytest.approx(
        plain["training_history"]["train_loss"]
    )
    assert compiled["test_accuracy"] == plain["test_accuracy"]
    loaded = afmp.load_checkpoint(tmp_path / "compiled")  # keys without the wrapper's "_orig_mod."
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), afmp.load_checkpoint(tmp_path / "eager").eval()(x))
