"""Weights as safetensors beside a JSON config, written atomically.

``DIR/model.safetensors`` holds the uncompiled module's state and ``DIR/model.json``
the registered name, the full config and the format version, so the model can be
rebuilt from the directory alone: ``afmp.load_checkpoint(DIR)``.

Format versions (``FORMAT``): 1 had no ``format`` key; 2 is written since AFMP's
``delaunay`` scaffold became the 6-offset triangulation. A model family whose config
meant something else in an older format has ``upgrade_config(config, version)``, so an
old checkpoint rebuilds the model it was saved from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from afmp.registry import create_model, model_entry

FORMAT = 2


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name in the same folder, then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def model_spec(model: nn.Module) -> dict:
    model = unwrap(model)
    return {"model": model.model_name, "config": dataclasses.asdict(model.cfg)}


def save_checkpoint(model: nn.Module, directory: str | os.PathLike, stem: str = "model", **extra) -> Path:
    """Write ``stem.safetensors`` and ``stem.json`` (model name, config, ``extra``) into ``directory``."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    atomic_write(directory / f"{stem}.safetensors", lambda tmp: save_file(state, str(tmp)))
    write_json(directory / f"{stem}.json", {"format": FORMAT, **model_spec(model), **extra})
    return directory / f"{stem}.safetensors"


def load_checkpoint(
    directory: str | os.PathLike, stem: str = "model", device="cpu", **overrides
) -> nn.Module:
    """Rebuild the model saved in ``directory`` (``overrides``: config fields to change, e.g. img_size)."""
    directory = Path(directory)
    spec_path, weights_path = directory / f"{stem}.json", directory / f"{stem}.safetensors"
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"no checkpoint at {directory}: expected {path.name} (written by afmp train)"
            )
    name, config = saved_config(spec_path)
    model = create_model(name, **{**config, **overrides})
    model.load_state_dict(load_file(str(weights_path), device=str(device)))
    return model.to(device)


def saved_config(spec_path: str | os.PathLike) -> tuple[str, dict]:
    """(registered name, config) of a checkpoint's JSON, upgraded from the format it was saved in."""
    spec = json.loads(Path(spec_path).read_text())
    version = spec.get("format", 1)
    if version > FORMAT:
        raise ValueError(f"{spec_path} has checkpoint format {version}; this afmp reads up to {FORMAT}")
    model_cls, _ = model_entry(spec["model"])
    upgrade = getattr(model_cls, "upgrade_config", None)
    config = upgrade(spec["config"], version) if upgrade else spec["config"]
    return spec["model"], config
