"""`afmp export`: ONNX and pt2 files that compute what the PyTorch model computes.

Exporting every preset at full size takes minutes (scripts/export_all.py does it, both
formats); here each family of the registry (a model class, and for the ViT skeleton each
token mixer) is exported once, small, with a dynamic batch, and checked at batch 1 and 7,
and again, from the saved file, at a batch size it was neither traced nor checked at.
"""

import re
import sys

import pytest
import torch

import afmp
import afmp_cli as cli
from afmp.deploy.export import FORMATS, NOT_EXPORTABLE, example, export_model, run_exported
from afmp.registry import model_entry
from test_reliability import snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

# One preset per family, small (one block: every block is the same code), in one format; AFMP's
# ONNX export is the command-line test below.
CASES = [
    ("afmp_tiny", {"num_layers": 1}, "pt2"),
    ("vit_baseline_tiny", {"depth": 1}, "pt2"),
    ("ripple_vit_tiny", {"depth": 1}, "onnx"),
    ("hydra_vit_tiny", {"depth": 1}, "pt2"),
    ("hydra_bolya_vit_tiny", {"depth": 1}, "pt2"),
    ("convnet_resnet10t", {}, "pt2"),
    ("diffusion_text", {}, "onnx"),
    ("transformer_text_matched", {"num_layers": 1}, "pt2"),
]


def family(name: str) -> tuple[str, str | None]:
    """A model class, and the token mixer for the ViT skeleton (one class, four mixers)."""
    model_cls, preset = model_entry(name)
    return model_cls.__name__, preset.get("attention")


def test_every_family_of_the_registry_is_exported_here_or_listed_as_not_exportable():
    covered = {family(name) for name, _, _ in CASES} | {family(name) for name in NOT_EXPORTABLE}
    assert {family(name) for name in afmp.list_models()} == covered


@pytest.mark.slow
@pytest.mark.parametrize("name,options,fmt", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_a_preset_of_each_family_exports_with_a_dynamic_batch_and_matches(name, options, fmt, tmp_path):
    torch.manual_seed(0)
    model = afmp.create_model(name, **options).eval()
    path = tmp_path / f"model{FORMATS[fmt]}"
    report = export_model(model, fmt, path, dynamic_batch=True)
    assert sorted(int(shape.split("x")[0]) for shape in report.max_abs_diff) == [1, 7]
    assert max(report.max_abs_diff.values()) <= 1e-4, report.max_abs_diff
    x = example(model, 3, 40 if "text" in name else None)  # a sequence model's length is dynamic too
    with torch.no_grad():
        torch.testing.assert_close(run_exported(path, fmt)(x), model(x), rtol=0, atol=1e-4)


def _saved_run(tmp_path, **options):
    torch.manual_seed(0)
    model = afmp.create_model("afmp_tiny", num_layers=1, num_classes=10, **options).eval()
    run = tmp_path / "run"
    afmp.save_checkpoint(model, run)
    return run


def test_afmp_export_onnx_with_a_dynamic_batch(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    # Trained with the stencil backend: exported with auto's plain-PyTorch one, the same function.
    run = _saved_run(tmp_path, backend="stencil")
    out = tmp_path / "deploy" / "afmp_tiny.onnx"
    argv = ["export", "--checkpoint", str(run), "--format", "onnx", "--dynamic-batch", "--opset", "18"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: exported with backend=auto (the run used stencil)" in printed
    diffs = re.search(r"onnxruntime against PyTorch, max \|difference\| of the logits: (\S+) at 1x3x32x32, "
                      r"(\S+) at 7x3x32x32", printed)  # fmt: skip
    assert diffs and max(float(d) for d in diffs.groups()) <= 1e-4, printed
    assert f"wrote {out} (afmp_tiny, onnx, traced on 2x3x32x32, dynamic batch)" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["afmp_tiny.onnx"]  # no temporary left
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain == ""] == [18]
    model = afmp.load_checkpoint(run).eval()
    assert model.cfg.backend == "stencil"
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(run_exported(out, "onnx")(x), model(x), rtol=0, atol=1e-4)


def _broken_runtime(path, fmt):
    run = run_exported(path, fmt)
    return lambda x: run(x) + 1e-3


# (case, argv after --checkpoint RUN, words of the one-line error)
BAD = [
    ("no run", ["--format", "pt2", "--out", "{tmp}/m.pt2", "--checkpoint", "{tmp}/nothing"], "no checkpoint at"),
    ("suffix", ["--format", "onnx", "--out", "{tmp}/m.pt2"], "expected a file name ending in .onnx for --format onnx"),
    ("out is a folder", ["--format", "pt2", "--out", "{tmp}/folder.pt2"], "is a directory"),
    ("opset with pt2", ["--format", "pt2", "--opset", "18", "--out", "{tmp}/m.pt2"], "--format pt2 has none"),
    ("old opset", ["--format", "onnx", "--opset", "9", "--out", "{tmp}/m.onnx"], "--opset must be 18 or higher"),
    ("batch 0", ["--format", "pt2", "--batch-size", "0", "--out", "{tmp}/m.pt2"], "--batch-size must be an integer >= 1"),
    ("atol", ["--format", "pt2", "--atol", "nan", "--out", "{tmp}/m.pt2"], "--atol must be a number >= 0"),
    ("no onnxruntime", ["--format", "onnx", "--out", "{tmp}/m.onnx"], "needs onnxruntime: pip install 'afmp[onnx]'"),
    ("mismatch", ["--format", "pt2", "--out", "{tmp}/m.pt2"], "differs from PyTorch by up to 0.001 (more than --atol 0.0001)"),
]  # fmt: skip


@pytest.mark.parametrize("case,argv,words", BAD, ids=[b[0] for b in BAD])
def test_bad_export_input_is_one_line_and_nothing_written(case, argv, words, tmp_path, capsys, monkeypatch):
    run = _saved_run(tmp_path)
    (tmp_path / "folder.pt2").mkdir()
    if case == "no onnxruntime":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    if case == "mismatch":  # an exporter that is off by 1e-3
        monkeypatch.setattr("afmp.deploy.export.run_exported", _broken_runtime)
    before = snapshot(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(["export", "--checkpoint", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("afmp export: error: ") and err.count("\n") == 1 and words in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--models", "afmp_tiny", "--runs", "runs/a"], "give --models or --runs, not both"),
        (["--repeats", "0"], "--batch-size and --repeats must be >= 1"),
        (["--models", "no_such_model"], "unknown model 'no_such_model'"),
    ],
)
def test_bad_bench_runtime_input_is_one_line_and_nothing_written(argv, words, tmp_path, capsys):
    assert cli.main(["bench", "runtime", *argv, "--out", str(tmp_path / "bench")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("afmp bench: error: ") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "bench").exists()
