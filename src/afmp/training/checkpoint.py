"""Weights as safetensors beside a JSON config, written atomically.

``DIR/model.safetensors`` holds the uncompiled module's state and ``DIR/model.json``
the registered name, the full config and the format version, so the model can be
rebuilt from the directory alone: ``afmp.load_checkpoint(DIR)``. A run's model.json also
holds ``pretrained_cfg``: its data's mean, std, class names (``label_names``) and resizing,
which the loaded model's ``pretrained_cfg`` takes.

Format versions (``FORMAT``): 1 had no ``format`` key; 2 is written since AFMP's
``delaunay`` scaffold became the 6-offset triangulation. A model family whose config
meant something else in an older format has ``upgrade_config(config, version)``, so an
old checkpoint rebuilds the model it was saved from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from afmp.registry import create_model, default_name, model_entry
from afmp.utils.errors import UsageError
from afmp.utils.files import atomic_write, sha256_file, write_json

FORMAT = 2


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def model_spec(model: nn.Module) -> dict:
    """The registered name (a class's first preset for a model built from its class) and config."""
    model = unwrap(model)
    name = getattr(model, "model_name", None) or default_name(type(model))
    return {"model": name, "config": dataclasses.asdict(model.cfg)}


def save_checkpoint(model: nn.Module, directory: str | os.PathLike, stem: str = "model", **extra) -> Path:
    """Write ``stem.safetensors`` and ``stem.json`` (model name, config, ``extra``) into ``directory``."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    weights = atomic_write(directory / f"{stem}.safetensors", lambda tmp: save_file(state, str(tmp)))
    # The JSON names the weights it belongs to: a torn pair or flipped bytes fail on load.
    spec = {"format": FORMAT, **model_spec(model), **extra, "sha256": sha256_file(weights)}
    write_json(directory / f"{stem}.json", spec)
    return weights


def load_checkpoint(
    directory: str | os.PathLike, stem: str = "model", device="cpu", **overrides
) -> nn.Module:
    """Rebuild the model saved in ``directory`` (``overrides``: config fields to change, e.g. img_size)."""
    directory = Path(directory)
    spec_path, weights_path = directory / f"{stem}.json", directory / f"{stem}.safetensors"
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise UsageError(f"no checkpoint at {directory}: expected {path.name} (written by afmp train)")
    name, config = saved_config(spec_path)
    model = create_model(name, **{**config, **overrides})
    model.load_state_dict(read_weights(weights_path, spec_path, device))
    # What the data set recorded at training time (mean, std, label_names, how files are
    # resized) replaces the preset's defaults; the input size stays the model's.
    saved = saved_pretrained_cfg(spec_path)
    if saved is not None:
        model.pretrained_cfg.update({k: v for k, v in saved.items() if k != "input_size"})
    return model.to(device)


def saved_pretrained_cfg(spec_path: str | os.PathLike) -> dict | None:
    """The data's pretrained_cfg a run saved with its weights; None for a checkpoint saved
    without one (before afmp kept it, or by save_checkpoint outside a run)."""
    saved = _read_spec(spec_path).get("pretrained_cfg")
    return saved if isinstance(saved, dict) else None


def read_weights(weights_path: Path, spec_path: Path, device="cpu") -> dict:
    """The tensors of ``weights_path``, checked against the checksum its JSON holds (when it
    holds one: format-1 files have none) and for NaN or infinity."""
    expected = _read_spec(spec_path).get("sha256")
    if expected is not None and sha256_file(weights_path) != expected:
        raise UsageError(
            f"{weights_path} does not match the checksum in {spec_path.name}: the file is corrupted "
            "or from another save"
        )
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(f"{weights_path} is not a readable safetensors file ({err})") from err
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UsageError(f"{weights_path} holds NaN or infinite weights in {', '.join(bad[:3])}")
    return state


def _read_spec(spec_path: str | os.PathLike) -> dict:
    try:
        spec = json.loads(Path(spec_path).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{spec_path} is not readable JSON ({err})") from err
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("model"), str)
        or not isinstance(spec.get("config"), dict)
    ):
        raise UsageError(f'{spec_path}: expected an object with "model" (a name) and "config" (an object)')
    return spec


def saved_config(spec_path: str | os.PathLike) -> tuple[str, dict]:
    """(registered name, config) of a checkpoint's JSON, upgraded from the format it was saved in."""
    spec = _read_spec(spec_path)
    version = spec.get("format", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise UsageError(f"{spec_path} has checkpoint format {version!r}; this afmp reads up to {FORMAT}")
    model_cls, _ = model_entry(spec["model"])
    upgrade = getattr(model_cls, "upgrade_config", None)
    config = upgrade(spec["config"], version) if upgrade else spec["config"]
    return spec["model"], config


def read_state(path: Path, required: list[str], device="cpu") -> dict:
    """A checkpoint's ``state.pt`` (optimizer, schedule, scaler, EMA, progress), read without
    running code from it: ``weights_only`` admits tensors, numbers, strings and containers.
    Anything else, an unreadable file or a missing entry, is one line naming the file."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False: the one thing not to do with a file that
        # holds more than state. Only its reason is kept ("Unsupported global: GLOBAL getattr ...").
        reason = str(err).partition("WeightsUnpickler error:")[2].strip().split("\n")[0].split(". ")[0]
        if "global" not in reason.lower():
            raise UsageError(f"{path} is not a readable state file ({reason or 'damaged'})") from None
        raise UsageError(
            f"{path} holds objects other than tensors, numbers and strings, which afmp does not load "
            f"(they could run code): it is not a state file afmp wrote ({reason})"
        ) from None
    except (OSError, RuntimeError, EOFError) as err:
        raise UsageError(f"{path} is not a readable state file ({' '.join(str(err).split())[:200]})") from err
    missing = [key for key in required if key not in state] if isinstance(state, dict) else required
    if missing:
        raise UsageError(f"{path}: expected the state of a training run, but it has no {', '.join(missing)}")
    return state
