"""In-memory image data sets: scikit-learn's digits (offline, the default) and a synthetic set."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from afmp.data import DataBundle, register_dataset


class TensorImages(Dataset):
    """Normalised (N, C, H, W) images with labels; training copies get augmentation:
    a random rotation by up to ``degrees`` and zoom by up to ``scale`` (bilinear), a random
    crop after ``crop_padding`` pixels of padding (a shift), a horizontal ``flip``.

    Whatever comes in from outside the image is ``fill`` (per channel): the normalised
    value of a raw 0, so it is background, as torchvision's transforms give when they
    run before Normalize.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        crop_padding: int = 0,
        flip: bool = False,
        degrees: float = 0.0,
        scale: float = 0.0,
        fill: torch.Tensor | None = None,
    ):
        if crop_padding < 0 or degrees < 0 or not 0 <= scale < 1:
            raise ValueError(
                f"expected crop_padding >= 0, degrees >= 0 and scale in [0, 1); "
                f"got {crop_padding}, {degrees}, {scale}"
            )
        self.images, self.labels = images, labels
        self.crop_padding, self.flip, self.degrees, self.scale = crop_padding, flip, degrees, scale
        self.fill = (
            torch.zeros(images.shape[1]) if fill is None else torch.as_tensor(fill, dtype=images.dtype)
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.degrees or self.scale:
            angle = self.degrees * (2 * torch.rand(()).item() - 1)
            zoom = 1 + self.scale * (2 * torch.rand(()).item() - 1)
            x = rotate_and_zoom(x, angle, zoom, self.fill)
        if self.crop_padding:
            p = self.crop_padding
            h, w = x.shape[-2:]
            padded = self.fill[:, None, None].expand(x.shape[0], h + 2 * p, w + 2 * p).clone()
            padded[:, p : p + h, p : p + w] = x
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = padded[:, top : top + h, left : left + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


def rotate_and_zoom(x: torch.Tensor, degrees: float, zoom: float, fill: torch.Tensor) -> torch.Tensor:
    """(C, H, W) image turned by ``degrees`` and magnified by ``zoom`` about its centre,
    bilinear; what comes in from outside is ``fill`` (C,)."""
    angle = math.radians(degrees)
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom  # output -> input coordinates
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=x.dtype)
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    background = fill.to(x.dtype)[:, None, None]
    # grid_sample fills with zeros outside: shift so that zero is the background.
    return F.grid_sample((x - background)[None], grid, align_corners=False)[0] + background


def split_indices(n: int, *, val_fraction: float, test_fraction: float, split_seed: int = 0):
    """Disjoint train / val / test index arrays from a fixed permutation (split_seed, not the run's seed)."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must leave a training set"
        )
    order = np.random.default_rng(split_seed).permutation(n)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def bundle_from_arrays(
    name, images, labels, *, val_fraction, test_fraction, num_classes, split_seed=0, **augment
) -> DataBundle:
    """Split, normalise with the training split's per-channel statistics, wrap in a bundle;
    ``augment``: TensorImages' options for the training split (crop_padding, degrees...)."""
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long)
    train, val, test = split_indices(
        len(labels), val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed
    )
    mean = images[train].mean(dim=(0, 2, 3))
    std = images[train].std(dim=(0, 2, 3)).clamp_min(1e-6)
    images = (images - mean[:, None, None]) / std[:, None, None]
    return DataBundle(
        name=name,
        train=TensorImages(images[train], labels[train], fill=-mean / std, **augment),
        val=TensorImages(images[val], labels[val]),
        test=TensorImages(images[test], labels[test]),
        model_args={"img_size": images.shape[-1], "in_chans": images.shape[1], "num_classes": num_classes},
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
    )


@register_dataset("digits")
def digits(
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    augment: bool = True,
    degrees: float = 0.0,
    scale: float = 0.0,
    shift: int = 1,
    **_,
) -> DataBundle:
    """scikit-learn's 1,797 handwritten digits, 8x8, one channel, ten classes (ships with scikit-learn).

    With ``augment``, training images are rotated by up to ``degrees``, zoomed by up to
    ``scale`` and shifted by up to ``shift`` pixels (never flipped: digits are not symmetric).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images[:, None].astype(np.float32) / 16.0
    bundle = bundle_from_arrays(
        "digits",
        images,
        d.target,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        num_classes=10,
        **(dict(crop_padding=shift, degrees=degrees, scale=scale) if augment else {}),
    )
    bundle.class_names = [str(i) for i in range(10)]
    return bundle


@register_dataset("synthetic")
def synthetic(
    *,
    num_samples: int = 1024,
    img_size: int = 32,
    in_chans: int = 3,
    num_classes: int = 10,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    **_,
) -> DataBundle:
    """A learnable toy set for smoke runs: class c is a bright square at a class-specific place, plus noise."""
    if img_size < 4:
        raise ValueError(f"synthetic images need img_size >= 4, got {img_size}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % num_classes
    images = 0.5 * torch.randn(num_samples, in_chans, img_size, img_size, generator=g)
    side = max(2, img_size // 4)
    cells = img_size - side
    for c in range(num_classes):
        top = (c * 7919) % (cells + 1)
        left = (c * 104729 // 7) % (cells + 1)
        images[labels == c, :, top : top + side, left : left + side] += 2.0
    return bundle_from_arrays(
        "synthetic",
        images,
        labels,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        num_classes=num_classes,
    )
