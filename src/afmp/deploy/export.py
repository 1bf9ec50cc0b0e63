"""A trained run taken out of Python: an ONNX file or a pt2 program, checked before it is kept.

    report = export_run("runs/afmp_tiny-digits", "onnx", "model.onnx", dynamic_batch=True)

The model is rebuilt from the run directory alone (``load_checkpoint``) on the CPU, in eval
mode, and traced on an input of its own shape: images (B, C, H, W) float32 at the run's
``img_size``, sequences (B, L) int64 token ids of any length L up to ``max_len`` (the length
is always dynamic: a sequence model takes whatever length it is given). The batch is fixed
at ``batch_size``, or dynamic with ``dynamic_batch``. ONNX goes through
``torch.onnx.export(dynamo=True)``, pt2 through ``torch.export.export`` and
``torch.export.save``.

The file is written under a temporary name, run beside the PyTorch model (onnxruntime, or
``torch.export.load``) on a few input shapes, and renamed into place only when the largest
absolute difference of the logits is within ``atol``; otherwise nothing is written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from afmp.training.checkpoint import load_checkpoint, saved_config
from afmp.utils.errors import UsageError
from afmp.utils.files import atomic_write

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}  # format -> the file suffix it must have

# Presets that cannot be exported, with the reason: export refuses them with it, and the
# README's "Export" section lists them. Every image and text preset exports in both formats
# and matches PyTorch (scripts/export_all.py checks them all; tests/test_export.py one per
# family); the point-set models are not built for it yet.
_POINT_SETS = (
    "takes a point-set batch (a dict of padded tensors whose set size and degree vary per batch); "
    "exporting point-set models is not built yet"
)
NOT_EXPORTABLE: dict[str, str] = {
    "afmp_points": _POINT_SETS,
    "graph_gcn": _POINT_SETS,
    "graph_gat": _POINT_SETS,
    "graph_gatedgcn": _POINT_SETS,
}

# Where a family has backends, the export takes the plain-PyTorch ones that `auto` picks on
# the CPU: a Triton kernel is a custom op that no runtime outside PyTorch can run.
PORTABLE_BACKEND = "auto"
ATOL = 1e-4  # fp32 logits; what the exports measured here reach is ~1e-6


@dataclasses.dataclass
class ExportReport:
    path: Path
    format: str
    model: str
    input_shape: tuple[int, ...]  # the traced input's shape
    dynamic: list[str]  # the input dimensions that are dynamic: "batch", "length"
    max_abs_diff: dict[str, float]  # per checked input shape ("7x3x32x32"): max |exported - PyTorch|
    notes: list[str]


def require_onnx() -> None:
    """onnx, onnxscript and onnxruntime (the ``afmp[onnx]`` extra), or a UsageError saying so."""
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UsageError(
            f"--format onnx needs {', '.join(missing)}: pip install 'afmp[onnx]' (or use --format pt2)"
        )


def check_request(out: str | Path, fmt: str, opset: int | None, batch_size: int, atol: float) -> Path:
    """The output path once the request makes sense; a UsageError before anything is built."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.suffix != FORMATS[fmt]:
        raise UsageError(f"--out {out}: expected a file name ending in {FORMATS[fmt]} for --format {fmt}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; expected a file name ending in {FORMATS[fmt]}")
    if opset is not None and fmt != "onnx":
        raise UsageError("--opset is ONNX's operator set version; --format pt2 has none")
    if opset is not None and opset < 18:
        raise UsageError(f"--opset must be 18 or higher (torch.onnx's dynamo exporter), got {opset}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be an integer >= 1, got {batch_size}")
    if not atol >= 0:
        raise UsageError(f"--atol must be a number >= 0, got {atol}")
    if fmt == "onnx":
        require_onnx()
    return out


def load_for_export(run: str | Path) -> tuple[nn.Module, list[str]]:
    """The run's model on the CPU in eval mode, with portable backends; and notes for the user."""
    run = Path(run)
    name, config = saved_config(run / "model.json") if (run / "model.json").is_file() else (None, {})
    if name in NOT_EXPORTABLE:
        raise UsageError(f"{name} cannot be exported: {NOT_EXPORTABLE[name]}")
    overrides = {"backend": PORTABLE_BACKEND} if "backend" in config else {}
    model = load_checkpoint(run, device="cpu", **overrides)  # a UsageError when it is no run
    notes = []
    if config.get("backend", "reference") not in ("reference", model.cfg.backend):
        notes.append(
            f"exported with backend={model.cfg.backend} (the run used {config['backend']}): "
            "the same function in plain PyTorch ops, which other runtimes can run"
        )
    return model.eval(), notes


def is_sequence_model(model: nn.Module) -> bool:
    return hasattr(model.cfg, "max_len") and not hasattr(model.cfg, "img_size")


def example(model: nn.Module, batch: int, length: int | None = None) -> torch.Tensor:
    """A fixed input of the model's kind: images, or token ids of ``length``."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(batch * 1_000 + (length or 0))
    try:
        return model.example_input(batch_size=batch, size=length)
    finally:
        torch.random.set_rng_state(generator_state)


def dynamic_shapes(model: nn.Module, dynamic_batch: bool) -> tuple[tuple | None, list[str]]:
    """torch.export's dynamic_shapes for the one input, and the names of its dynamic dimensions."""
    dims = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=1 << 16)
    if is_sequence_model(model):
        dims[1] = torch.export.Dim("length", min=3, max=model.cfg.max_len)
    return ((dims,) if dims else None), [d.__name__ for d in dims.values()]


def checked_shapes(model: nn.Module, dynamic_batch: bool, batch_size: int) -> list[tuple[int, int | None]]:
    """(batch, length) pairs the export is checked on: batch 1 and 7 when the batch is dynamic;
    two lengths for a sequence model, since its length always is."""
    batches = (1, 7) if dynamic_batch else (batch_size, batch_size)
    lengths = (64, 17) if is_sequence_model(model) else (None, None)
    return sorted(set(zip(batches, lengths)), key=lambda p: p[0])


def write_program(model: nn.Module, traced: torch.Tensor, fmt: str, shapes: tuple, opset, path: Path) -> None:
    """Export ``model`` traced on ``traced`` and save it to ``path`` in ``fmt``."""
    if fmt == "onnx":
        program = torch.onnx.export(
            model,
            (traced,),
            dynamo=True,
            dynamic_shapes=shapes,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            verbose=False,
        )
        program.save(str(path))
    else:
        program = torch.export.export(model, (traced,), dynamic_shapes=shapes)
        with open(path, "wb") as f:  # a file object: torch.export warns of a name not ending in .pt2
            torch.export.save(program, f)


def run_exported(path: Path, fmt: str):
    """A function that runs the saved program on a CPU tensor and returns its logits as a tensor."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    with open(path, "rb") as f:
        module = torch.export.load(f).module()
    return lambda x: module(x)


@torch.no_grad()
def compare(model: nn.Module, run, inputs: list[torch.Tensor]) -> dict[str, float]:
    """max |run(x) - model(x)| per input, keyed by its shape."""
    return {
        "x".join(map(str, x.shape)): float((run(x).double() - model(x).double()).abs().max()) for x in inputs
    }


def export_run(
    run: str | Path,
    fmt: str,
    out: str | Path,
    *,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    opset: int | None = None,
    atol: float = ATOL,
) -> ExportReport:
    """Export the run's model (see the module's docstring); the file is kept only if it matches."""
    out = check_request(out, fmt, opset, batch_size, atol)
    model, notes = load_for_export(run)
    return export_model(
        model,
        fmt,
        out,
        dynamic_batch=dynamic_batch,
        batch_size=batch_size,
        opset=opset,
        atol=atol,
        notes=notes,
    )


def export_model(
    model: nn.Module,
    fmt: str,
    out: Path,
    *,
    dynamic_batch: bool,
    batch_size: int = 1,
    opset: int | None = None,
    atol: float = ATOL,
    notes: list[str] | None = None,
) -> ExportReport:
    """Export an eval-mode model on the CPU to ``out``, checked against itself (``export_run``'s
    second half; what tests and ``afmp bench runtime`` call on models built in memory)."""
    # torch.export takes a batch of 1 for a constant: a dynamic batch is traced at 2.
    traced = example(model, 2 if dynamic_batch else batch_size)
    shapes, dynamic = dynamic_shapes(model, dynamic_batch)
    inputs = [example(model, b, length) for b, length in checked_shapes(model, dynamic_batch, batch_size)]
    report = ExportReport(Path(out), fmt, model.model_name, tuple(traced.shape), dynamic, {}, notes or [])

    def write_then_check(tmp: Path) -> None:
        write_program(model, traced, fmt, shapes, opset, tmp)
        report.max_abs_diff = compare(model, run_exported(tmp, fmt), inputs)
        worst = max(report.max_abs_diff.values())
        if not worst <= atol:  # NaN fails too
            raise UsageError(
                f"the exported {model.model_name} differs from PyTorch by up to {worst:.3g} "
                f"(more than --atol {atol:g}) on inputs {', '.join(report.max_abs_diff)}; {out} not written"
            )

    atomic_write(out, write_then_check)
    return report
