"""In-memory image data sets: scikit-learn's digits (offline, the default) and a synthetic set."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from afmp.data import DataBundle, register_dataset


class TensorImages(Dataset):
    """Normalised (N, C, H, W) images with labels; training copies get crop-and-flip augmentation."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, *, crop_padding: int = 0, flip: bool = False
    ):
        self.images, self.labels = images, labels
        self.crop_padding, self.flip = crop_padding, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.crop_padding:
            p = self.crop_padding
            h, w = x.shape[-2:]
            padded = F.pad(x, (p, p, p, p))
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = padded[:, top : top + h, left : left + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


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
    name, images, labels, *, val_fraction, test_fraction, crop_padding, flip, num_classes, split_seed=0
) -> DataBundle:
    """Split, normalise with the training split's per-channel statistics, wrap in a bundle."""
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
        train=TensorImages(images[train], labels[train], crop_padding=crop_padding, flip=flip),
        val=TensorImages(images[val], labels[val]),
        test=TensorImages(images[test], labels[test]),
        model_args={"img_size": images.shape[-1], "in_chans": images.shape[1], "num_classes": num_classes},
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
    )


@register_dataset("digits")
def digits(*, val_fraction: float = 0.1, test_fraction: float = 0.2, augment: bool = True, **_) -> DataBundle:
    """scikit-learn's 1,797 handwritten digits, 8x8, one channel, ten classes (ships with scikit-learn)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images[:, None].astype(np.float32) / 16.0
    bundle = bundle_from_arrays(
        "digits",
        images,
        d.target,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        crop_padding=1 if augment else 0,
        flip=False,
        num_classes=10,
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
        crop_padding=0,
        flip=False,
        num_classes=num_classes,
    )
