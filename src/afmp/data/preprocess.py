"""An image file to a model's input: read with Pillow, converted, resized, normalised.

One ``Preprocess`` serves the ``imagefolder`` data set's evaluation splits and ``afmp
predict``, so a file predicted after training goes through exactly what ``afmp eval``
measured. It is saved with the weights in timm's ``pretrained_cfg`` terms (``crop_mode``,
``interpolation``, ``mean``, ``std``) and read back from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from afmp.utils.errors import UsageError

# timm's crop modes: "center" resizes the shorter side to the size and cuts the middle out;
# "squash" resizes both sides to it, whatever the aspect ratio.
CROP_MODES = ("center", "squash")
INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
# Modes whose pixels are one grey value (Pillow's names); everything else is read as colour.
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _unreadable(path, err: BaseException, what: str) -> UsageError:
    return UsageError(f"{path} {what} ({_one_line(err)})")


def image_mode(path: str | Path) -> str:
    """Pillow's mode of ``path`` ("RGB", "L"...), from its header alone."""
    try:
        with Image.open(path) as image:
            return image.mode
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for damaged files
        raise _unreadable(path, err, "is not an image Pillow can read") from None


def open_image(path: str | Path) -> Image.Image:
    """``path`` decoded whole (so a truncated file fails here, not in the middle of training);
    a UsageError naming the file when Pillow cannot read it."""
    try:
        image = Image.open(path)
    except Exception as err:
        raise _unreadable(path, err, "is not an image Pillow can read") from None
    with image:
        try:
            image.load()
        except Exception as err:  # the header read, the pixels did not: a truncated or damaged file
            raise _unreadable(path, err, "is truncated or damaged: Pillow cannot decode it") from None
        return image.copy()  # closing the file frees a loaded image's pixels


def is_grey(mode: str) -> bool:
    return mode in GREY_MODES


def check_channel_stats(name: str, values, channels: int) -> tuple[float, ...]:
    """``mean`` or ``std`` as given by the user: one number, or one per channel; finite (std > 0)."""
    numbers = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(numbers) == 1:
        numbers = numbers * channels
    ok = len(numbers) == channels and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers
    )
    if not ok or (name == "std" and min(numbers) <= 0):
        positive = ", positive" if name == "std" else ""
        raise UsageError(
            f"{name} must be one finite{positive} number or {channels} of them (one a channel, "
            f"e.g. {name}=[0.5,0.5,0.5]), got {values!r}"
        )
    return tuple(float(v) for v in numbers)


@dataclass(frozen=True)
class Preprocess:
    """The steps from a decoded image to a (C, S, S) float tensor, in order: convert to
    ``in_chans`` channels, resize by ``crop_mode`` with ``interpolation`` to ``img_size``,
    scale to [0, 1], subtract ``mean`` and divide by ``std`` per channel."""

    img_size: int
    in_chans: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    crop_mode: str = "center"
    interpolation: str = "bicubic"

    def __post_init__(self):
        if not isinstance(self.img_size, int) or isinstance(self.img_size, bool) or self.img_size < 1:
            raise UsageError(f"img_size must be a positive integer, got {self.img_size!r}")
        if self.in_chans not in (1, 3):
            raise UsageError(f"images are read with 1 or 3 channels, not {self.in_chans!r}")
        if self.crop_mode not in CROP_MODES:
            raise UsageError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
            )

    def pixels(self, image: Image.Image) -> np.ndarray:
        """(C, S, S) uint8: the image converted and resized, before normalisation."""
        if image.mode.startswith("I"):  # 16-bit grey (PNG, TIFF): Pillow's convert would clip at 255
            wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
            image = Image.fromarray((wide >> 8).astype(np.uint8))
        image = image.convert("RGB" if self.in_chans == 3 else "L")
        size, (width, height) = self.img_size, image.size
        resample = INTERPOLATIONS[self.interpolation]
        if self.crop_mode == "squash":
            image = image.resize((size, size), resample)
        else:  # the shorter side to `size`, then the middle `size` x `size`
            scale = size / min(width, height)
            new = (max(size, round(width * scale)), max(size, round(height * scale)))
            if new != (width, height):
                image = image.resize(new, resample)
            left, top = (new[0] - size) // 2, (new[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def normalise(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(pixels.astype(np.float32) / 255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalise(self.pixels(image))

    def pretrained_cfg(self) -> dict:
        """The timm ``pretrained_cfg`` keys that say how this model's inputs are made."""
        return {
            "crop_mode": self.crop_mode,
            "crop_pct": 1.0,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_pretrained_cfg(cls, cfg: dict, img_size: int, in_chans: int) -> Preprocess:
        """What ``pretrained_cfg`` recorded (mean and std required; resizing as timm's defaults
        when absent: a run on a data set whose images already have the model's size)."""
        if cfg.get("mean") is None or cfg.get("std") is None:
            raise UsageError("the checkpoint records no mean and std of its training images")
        return cls(
            img_size,
            in_chans,
            check_channel_stats("mean", cfg["mean"], in_chans),
            check_channel_stats("std", cfg["std"], in_chans),
            cfg.get("crop_mode", "center"),
            cfg.get("interpolation", "bicubic"),
        )
