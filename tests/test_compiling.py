"""`afmp train --compile auto|off|on|graphs` (afmp.training.compiling): auto's rule, what each
mode hands torch.compile, and what a run records and says."""

import pytest
import torch
import yaml

import afmp_cli as cli
from afmp.training import compiling
from afmp.training.config import config_from_args
from afmp.training.train import TrainConfig, train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # choose reads the type alone: no GPU needed
PAYS = compiling.CPU_PAYS_AFTER_STEPS


def test_auto_compiles_a_cpu_run_from_the_measured_crossover_and_stays_eager_on_cuda():
    # The crossover itself: the measured compile time over the measured saving per step.
    assert PAYS == round(
        compiling.CPU_COMPILE_S / (compiling.CPU_EAGER_STEP_S - compiling.CPU_COMPILED_STEP_S)
    )
    assert compiling.choose("auto", CPU, PAYS - 1).mode == "off"
    assert compiling.choose("auto", CPU, PAYS).mode == "on"
    # No compile mode has been timed on a GPU: auto stays with what has run there.
    assert compiling.choose("auto", CUDA, 10**9).mode == "off"
    assert (
        f"{PAYS - 1} steps on the CPU, fewer than the {PAYS}"
        in compiling.choose("auto", CPU, PAYS - 1).reason
    )
    # What is asked is taken as asked, wherever; a bool is an older config.yaml's on / off.
    for asked in ("off", "on", "graphs"):
        assert compiling.choose(asked, CUDA, 10**9) == compiling.Choice(asked, "as asked")
    assert compiling.choose(True, CPU, 1).mode == "on" and compiling.choose(False, CUDA, 1).mode == "off"
    with pytest.raises(ValueError, match="compile must be one of auto, off, on, graphs, got 'yes'"):
        compiling.choose("yes", CPU, 1)


def test_each_mode_hands_torch_compile_its_own_mode(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    model = torch.nn.Linear(2, 2)
    assert compiling.compiled(model, compiling.Choice("off", "")) is model and calls == []
    compiling.compiled(model, compiling.Choice("on", ""))
    compiling.compiled(model, compiling.Choice("graphs", ""))
    assert calls == [{"mode": None}, {"mode": "reduce-overhead"}]


def test_the_command_line_takes_a_mode_and_compile_alone_means_on(tmp_path, capsys):
    def parse(*flags):
        argv = ["train", *flags]
        return config_from_args(cli.build_parser(argv).parse_args(argv)).compile

    assert (parse(), parse("--compile"), parse("--compile", "graphs")) == ("auto", "on", "graphs")
    with pytest.raises(SystemExit):
        parse("--compile", "sometimes")
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("compile: sometimes\n")
    argv = ["train", "--config", str(bad), "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert "compile must be auto or off or on or graphs, got 'sometimes'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_says_and_records_what_auto_chose(tmp_path, capsys):
    tiny = dict(dataset="synthetic", data_opts={"num_samples": 64, "img_size": 16}, batch_size=16)
    cfg = TrainConfig(model="afmp_tiny", epochs=1, out=str(tmp_path / "run"), **tiny)
    train(cfg)
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("afmp_tiny on "))
    # 48 training images (64 less the validation split) in batches of 16: 3 steps, far below the crossover.
    assert first.endswith(
        f"compile: off (auto: 3 steps on the CPU, fewer than the {PAYS} after which compiling pays)"
    )
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["compile"] == "auto" and saved["compile_resolved"]["mode"] == "off"
    # The run's config.yaml, passed back with --config, is a valid setting: the record is dropped.
    argv = ["train", "--config", str(tmp_path / "run" / "config.yaml")]
    assert config_from_args(cli.build_parser(argv).parse_args(argv)).compile == "auto"
