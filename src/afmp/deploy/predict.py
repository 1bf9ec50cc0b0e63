"""The classes of image files, by a trained run: what ``afmp predict`` does.

The model, its class names and its preprocessing (``afmp.data.preprocess.Preprocess``,
which the ``imagefolder`` data set's evaluation splits use too) come from the run
directory alone: model.json's ``pretrained_cfg`` and config.yaml's ``amp``. Files are
read, batched and classified in order; the table is written at the end in one atomic
write, so an unreadable file stops the command with nothing written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from afmp.data.preprocess import Preprocess, open_image
from afmp.training.checkpoint import load_checkpoint, saved_pretrained_cfg
from afmp.training.config import run_settings
from afmp.utils.errors import UsageError, usage_errors
from afmp.utils.files import write_csv, write_json
from afmp.utils.runtime import autocast, resolve_device

OUTPUT_SUFFIXES = (".csv", ".json")


@dataclass
class Predictor:
    """A run's model on a device, with the class names and preprocessing it was trained with."""

    directory: Path
    model: torch.nn.Module
    preprocess: Preprocess
    class_names: list[str]
    device: torch.device
    amp: bool

    @classmethod
    def from_run(cls, directory: str | os.PathLike, device: str = "auto") -> Predictor:
        with usage_errors():
            directory = Path(directory)
            dev = resolve_device(device)
            model = load_checkpoint(directory, device=dev).eval()
            if not hasattr(model.cfg, "img_size"):
                raise UsageError(f"{directory}'s model {model.model_name} reads token sequences, not images")
            # What the run recorded, never the preset's defaults (another data set's statistics).
            cfg = saved_pretrained_cfg(directory / "model.json") or {}
            try:
                preprocess = Preprocess.from_pretrained_cfg(cfg, model.cfg.img_size, model.cfg.in_chans)
            except UsageError as err:
                raise UsageError(
                    f"{directory / 'model.json'}: {err} (it was saved before afmp kept them with the "
                    "weights): train it again to predict files with it"
                ) from None
            names = cfg.get("label_names") or [str(i) for i in range(model.num_classes)]
            if len(names) != model.num_classes:
                raise UsageError(
                    f"{directory / 'model.json'} names {len(names)} classes, its model has {model.num_classes}"
                )
            amp = run_settings(directory).get("amp", True)  # as afmp eval runs it
        return cls(directory, model, preprocess, list(names), dev, amp)


def find_images(paths: list[str | os.PathLike]) -> list[Path]:
    """The files named, and the image files under the folders named (by Pillow's extensions,
    sorted, hidden ones skipped); a UsageError for a path that is not there or finds nothing."""
    suffixes = set(Image.registered_extensions())
    files = []
    for given in paths:
        path = Path(given)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in suffixes
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise UsageError(f"{path} holds no image files ({', '.join(sorted(suffixes)[:6])}...)")
            files.extend(found)
        else:
            raise UsageError(f"{path} is neither a file nor a folder")
    if not files:
        raise UsageError("no image files or folders given")
    return files


class ImageFileList(Dataset):
    def __init__(self, files: list[Path], preprocess: Preprocess):
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(open_image(self.files[i]))


@torch.no_grad()
def predict_files(
    predictor: Predictor, files: list[Path], *, top_k: int = 5, batch_size: int = 64
) -> list[dict]:
    """Per file, in order: {"file", "top": [{"class", "index", "probability"}, ...]} of the
    ``top_k`` most probable classes (all of them when there are fewer)."""
    if batch_size < 1 or top_k < 1:
        raise UsageError(f"--batch-size and --top-k must be positive, got {batch_size} and {top_k}")
    k = min(top_k, len(predictor.class_names))
    loader = DataLoader(ImageFileList(files, predictor.preprocess), batch_size=batch_size)
    bar = tqdm(
        total=len(files),
        desc="predicting",
        unit="img",
        leave=False,
        disable=None if len(files) > batch_size else True,
    )
    rows = []
    for inputs in loader:
        with autocast(predictor.device, predictor.amp):
            logits = predictor.model(inputs.to(predictor.device))
        probs, indices = logits.float().softmax(-1).topk(k, dim=-1)
        for p, i in zip(probs.cpu().tolist(), indices.cpu().tolist()):
            top = [{"class": predictor.class_names[c], "index": c, "probability": q} for c, q in zip(i, p)]
            rows.append({"file": str(files[len(rows)]), "top": top})
        bar.update(len(inputs))
    bar.close()
    return rows


def write_predictions(out: str | os.PathLike, rows: list[dict], predictor: Predictor) -> Path:
    """CSV (file, class_1, probability_1, ...) or JSON (the rows, with the run they came from)."""
    out = Path(out)
    if out.suffix == ".json":
        meta = {"checkpoint": str(predictor.directory), "model": predictor.model.model_name}
        return write_json(out, {**meta, "classes": predictor.class_names, "predictions": rows})
    k = max(len(r["top"]) for r in rows)
    columns = ["file"] + [f"{key}_{j}" for j in range(1, k + 1) for key in ("class", "probability")]
    table = [
        {
            "file": r["file"],
            **{f"{key}_{j + 1}": t[key] for j, t in enumerate(r["top"]) for key in ("class", "probability")},
        }
        for r in rows
    ]
    return write_csv(out, table, columns)


def check_output(out: str | os.PathLike | None) -> None:
    """--out must end in .csv or .json (checked before any work)."""
    if out is not None and Path(out).suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out must end in .csv or .json, got {out}")
