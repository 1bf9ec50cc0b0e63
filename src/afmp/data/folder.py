"""``imagefolder``: your own images, one folder per class (timm's and torchvision's ImageFolder)::

    DIR/train/<class>/*.png|jpg|...   required; at least two classes
    DIR/val/<class>/...               optional; else held out of train/ (val_fraction)
    DIR/test/<class>/...              optional; else held out of train/ (test_fraction)

Every file is decoded once before training starts, so a file that is not an image, a
truncated one, an empty class folder, a single class or a class of val/ or test/ that
train/ lacks is a one-line error naming it before anything is written. What that check
finds (the channel count, and the training images' per-channel mean and std after
resizing) is cached in ``$AFMP_CACHE/imagefolder/``, keyed by every file's path, size and
modification time, so ``afmp eval`` and later runs on the same folder skip the decoding.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from afmp.data.base import DataBundle, DataUnavailable, register_dataset
from afmp.data.images import augment_image, split_indices
from afmp.data.preprocess import Preprocess, check_channel_stats, image_mode, is_grey, open_image
from afmp.utils.environment import cache_dir
from afmp.utils.errors import UsageError
from afmp.utils.files import write_json

SPLITS = ("train", "val", "test")
LAYOUT = "DIR/train/<class>/<image files>, and optionally DIR/val/<class>/ and DIR/test/<class>/"
SPLIT_SEED = 0  # held-out splits are fixed: the same images whatever the run's seed
CACHE_VERSION = 1


def list_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted; hidden files and folders (".DS_Store") are skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def read_split(root: Path, split: str) -> dict[str, list[Path]] | None:
    """{class name: its files} of ``root/split``, or None when the folder is absent."""
    folder = root / split
    if not folder.is_dir():
        return None
    classes = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise UsageError(f"{entry} is not in a class folder; expected {LAYOUT}")
        files = list_files(entry)
        if not files:
            raise UsageError(f"{entry} is an empty class folder: it holds no image files")
        classes[entry.name] = files
    if not classes:
        raise UsageError(f"{folder} holds no class folders; expected {LAYOUT}")
    return classes


def check_classes(root: Path, found: dict[str, dict | None]) -> list[str]:
    """The class names (train/'s folders, sorted); val/ and test/ may not add any."""
    names = list(found["train"])
    if len(names) < 2:
        raise UsageError(
            f"{root / 'train'} has one class folder ({names[0]}); a classifier needs two or more"
        )
    for split in ("val", "test"):
        for name in found[split] or {}:
            if name not in found["train"]:
                raise UsageError(
                    f"{root / split / name}: class {name!r} is not in {root / 'train'} "
                    f"(its classes: {', '.join(names)})"
                )
    return names


def hold_out(root, samples, labels, *, val_fraction, test_fraction, class_names):
    """Fixed, stratified (train, val, test) index arrays of train/'s samples; the fractions
    of a split that has its own folder are 0."""
    train, val, test = split_indices(
        len(samples),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split_seed=SPLIT_SEED,
        stratify=labels,
    )
    for split, fraction, indices in (("val", val_fraction, val), ("test", test_fraction, test)):
        if fraction and not len(indices):
            raise UsageError(
                f"{root / 'train'} holds {len(samples)} images: too few to hold out a {split} split "
                f"({split}_fraction {fraction}); add images, or a {root / split} folder"
            )
    kept = np.bincount(np.asarray(labels)[train], minlength=len(class_names))
    if (kept == 0).any():
        name = class_names[int(np.flatnonzero(kept == 0)[0])]
        raise UsageError(
            f"{root / 'train' / name} has too few images to keep one for training after holding out "
            f"validation and test images; add images, or {root / 'val'} and {root / 'test'} folders"
        )
    return train, val, test


def cache_key(root: Path, files: list[Path], train_files: list[Path], settings: dict) -> str:
    """Changes when any file is added, removed, rewritten or moved between splits, or a setting changes."""
    listing = [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    trained = [str(p.relative_to(root)) for p in train_files]
    text = json.dumps([CACHE_VERSION, str(root.resolve()), settings, listing, trained])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def check_and_measure(root: Path, files: list[Path], train_files: list[Path], settings: dict) -> dict:
    """Decode every file (a UsageError names the first that fails); the channel count, the
    grey files, and the mean and std of the training files as the model sees them."""
    modes = {path: image_mode(path) for path in files}  # headers: a non-image fails before any decoding
    grey = [p for p in files if is_grey(modes[p])]
    in_chans = settings["in_chans"] or (1 if len(grey) == len(files) else 3)
    resize = Preprocess(
        settings["img_size"], in_chans, (), (), settings["crop_mode"], settings["interpolation"]
    )
    sums, squares, count = np.zeros(in_chans), np.zeros(in_chans), 0
    training = set(train_files)
    for path in tqdm(files, desc="checking images", unit="img", leave=False, disable=None):
        pixels = resize.pixels(open_image(path))
        if path in training:  # float64 sums: exact enough over millions of pixels
            values = pixels.reshape(in_chans, -1).astype(np.float64) / 255.0
            sums += values.sum(1)
            squares += (values**2).sum(1)
            count += values.shape[1]
    mean = sums / count
    std = np.sqrt(np.maximum(squares - count * mean**2, 0.0) / max(count - 1, 1))
    return {
        "in_chans": in_chans,
        "mean": mean.tolist(),
        "std": np.maximum(std, 1e-6).tolist(),  # a constant channel is not divided by zero
        "grey": [str(p.relative_to(root)) for p in grey] if in_chans == 3 else [],
    }


def cached_check(root: Path, files: list[Path], train_files: list[Path], settings: dict) -> dict:
    path = cache_dir() / "imagefolder" / f"{cache_key(root, files, train_files, settings)}.json"
    try:
        found = json.loads(path.read_text())
        if isinstance(found, dict) and {"in_chans", "mean", "std", "grey"} <= set(found):
            return found
    except (OSError, ValueError):
        pass  # not checked yet (or an unreadable cache file): check again
    found = check_and_measure(root, files, train_files, settings)
    write_json(path, found)
    return found


class FolderImages(Dataset):
    """(path, label) samples, each read and preprocessed when asked for; ``augment``:
    augment_image's options for training (a horizontal flip, a shift)."""

    def __init__(self, samples: list[tuple[Path, int]], preprocess: Preprocess, augment: dict | None = None):
        self.samples, self.preprocess, self.augment = samples, preprocess, augment
        # What a shift brings in from outside the image: a raw 0 (black), normalised.
        self.fill = -torch.tensor(preprocess.mean) / torch.tensor(preprocess.std)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        x = self.preprocess(open_image(path))
        if self.augment:
            x = augment_image(x, degrees=0.0, scale=0.0, fill=self.fill, **self.augment)
        return x, label


@register_dataset("imagefolder")
def imagefolder(
    *,
    data_dir: str | None = None,
    img_size: int = 32,
    in_chans: int | None = None,
    crop_mode: str = "center",
    interpolation: str = "bicubic",
    mean=None,
    std=None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    flip: bool = True,
    shift: int = 0,
    download: bool = False,
    seed: int = 0,
) -> DataBundle:
    """Your own images under ``data_dir`` (see the module's docstring for the layout).

    Images are resized to ``img_size`` (``crop_mode`` center: the shorter side, then the
    middle; squash: both sides) with ``interpolation``, read with ``in_chans`` channels (by
    default 3, or 1 when every image is grey; grey images among colour ones are converted,
    and said so), and normalised by the training images' ``mean`` and ``std`` unless given
    (one number, or one per channel). Training images are flipped (``flip``) and shifted by
    up to ``shift`` pixels. Where val/ or test/ is missing, ``val_fraction`` or
    ``test_fraction`` of train/ is held out: stratified, and fixed whatever ``seed`` is.
    """
    if download:
        raise UsageError("imagefolder reads your own images: there is nothing to download (drop --download)")
    if not data_dir:
        raise DataUnavailable(f"imagefolder needs --data-dir DIR, with {LAYOUT}")
    root = Path(str(data_dir)).expanduser()
    if not (root / "train").is_dir():
        raise DataUnavailable(f"no {root / 'train'} folder; imagefolder expects {LAYOUT}")
    if in_chans not in (None, 1, 3):
        raise UsageError(
            f"in_chans must be 1 or 3 (default: 3, or 1 when every image is grey), got {in_chans!r}"
        )
    if not isinstance(shift, int) or isinstance(shift, bool) or shift < 0:
        raise UsageError(f"shift must be a whole number of pixels >= 0, got {shift!r}")
    Preprocess(img_size, in_chans or 3, (), (), crop_mode, interpolation)  # checks the resize options
    found = {split: read_split(root, split) for split in SPLITS}
    class_names = check_classes(root, found)
    label = {name: i for i, name in enumerate(class_names)}
    listed = {
        split: [(path, label[name]) for name, files in (found[split] or {}).items() for path in files]
        for split in SPLITS
    }
    labels = [y for _, y in listed["train"]]
    indices = hold_out(
        root,
        listed["train"],
        labels,
        val_fraction=0.0 if found["val"] else val_fraction,
        test_fraction=0.0 if found["test"] else test_fraction,
        class_names=class_names,
    )
    samples = {"train": [listed["train"][i] for i in indices[0]]}
    for split, index in (("val", indices[1]), ("test", indices[2])):
        samples[split] = listed[split] if found[split] else [listed["train"][i] for i in index]
    files = [path for split in SPLITS for path, _ in listed[split]]
    settings = dict(img_size=img_size, in_chans=in_chans, crop_mode=crop_mode, interpolation=interpolation)
    checked = cached_check(root, files, [p for p, _ in samples["train"]], settings)
    channels = checked["in_chans"]
    if checked["grey"]:
        print(
            f"imagefolder: {len(checked['grey'])} grey image(s) read as RGB (the first: {root / checked['grey'][0]})"
        )
    preprocess = Preprocess(
        img_size,
        channels,
        check_channel_stats("mean", checked["mean"] if mean is None else mean, channels),
        check_channel_stats("std", checked["std"] if std is None else std, channels),
        crop_mode,
        interpolation,
    )
    held_out = {
        split: [str(p.relative_to(root)) for p, _ in samples[split]]
        for split in ("val", "test")
        if not found[split]
    }
    return DataBundle(
        name="imagefolder",
        train=FolderImages(samples["train"], preprocess, dict(crop_padding=shift, flip=bool(flip))),
        val=FolderImages(samples["val"], preprocess),
        test=FolderImages(samples["test"], preprocess),
        model_args={"img_size": img_size, "in_chans": channels, "num_classes": len(class_names)},
        class_names=class_names,
        mean=preprocess.mean,
        std=preprocess.std,
        input_cfg=preprocess.pretrained_cfg(),
        info={
            "data_dir": str(root),
            "classes": class_names,
            "images": {split: len(samples[split]) for split in SPLITS},
            # The held-out splits, so the run says which files it validated and tested on.
            "held_out_of_train": {"split_seed": SPLIT_SEED, "stratified": True, **held_out}
            if held_out
            else None,
            "grey_read_as_rgb": checked["grey"],
        },
    )
