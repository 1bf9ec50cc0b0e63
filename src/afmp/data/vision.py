"""Image data sets read from disk: CIFAR-10, CIFAR-100 (the python batch files) and Tiny ImageNet.

Nothing is downloaded unless asked (``--download``); with no files, a DataUnavailable
says where to put them. Each set keeps its official test split as our test split and
holds a validation split out of the training files (fixed ``split_seed``, so every run
and seed validates on the same images). Training images get the usual augmentation
(random crop with 4-pixel padding, horizontal flip); every split is normalised with the
data set's own per-channel statistics.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.utils import download_and_extract_archive

from afmp.data.base import DataBundle, DataUnavailable, register_dataset
from afmp.data.images import split_indices
from afmp.data.stats import STATS  # per-channel mean and std of each set's training images


def image_transforms(name: str, size: int, train: bool):
    mean, std = STATS[name]
    augment = [transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip()] if train else []
    return transforms.Compose([*augment, transforms.ToTensor(), transforms.Normalize(mean, std)])


class Transformed(Dataset):
    """``base[indices[i]]`` (a PIL image and a label) through ``transform``."""

    def __init__(self, base, indices, transform):
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.base[int(self.indices[i])]
        return self.transform(image), label


def bundle_from_splits(name, train_base, test_base, *, img_size, num_classes, class_names, val_fraction):
    """Hold ``val_fraction`` of the training files out as validation; the official test set stays test."""
    train_idx, val_idx, _ = split_indices(len(train_base), val_fraction=val_fraction, test_fraction=0.0)
    train_tf, eval_tf = image_transforms(name, img_size, True), image_transforms(name, img_size, False)
    mean, std = STATS[name]
    return DataBundle(
        name=name,
        train=Transformed(train_base, train_idx, train_tf),
        val=Transformed(train_base, val_idx, eval_tf),
        test=Transformed(test_base, range(len(test_base)), eval_tf),
        model_args={"img_size": img_size, "in_chans": 3, "num_classes": num_classes},
        class_names=list(class_names),
        mean=mean,
        std=std,
    )


# -- CIFAR ----------------------------------------------------------------------------------
# The python version of CIFAR-10/100 is a folder of pickles (written by Python 2 with
# protocol 2). They are read with a restricted unpickler, never pickle.load: a pickle can
# name any importable callable and have it called, so a crafted file would run code as the
# user. These files hold dicts of numpy arrays, lists, strings and numbers, so the only
# globals allowed are numpy's array reconstruction. Local files are not checked against
# the official md5s (files written in the same format load); a download is, through the
# archive's md5 before extraction.
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class CifarFiles:
    title: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    archive: str
    md5: str  # of the archive


CIFAR = {
    "cifar10": CifarFiles(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{b}" for b in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
        10,
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": CifarFiles(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        "fine_labels",
        "fine_label_names",
        100,
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


def _latin1_encode(text, encoding):
    """``_codecs.encode`` as Python 3 uses it to write bytes at protocol 2; nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode of {type(text).__name__} to {encoding!r}")
    return text.encode("latin-1")


# numpy's own array reconstructors, looked up from an array so that no numpy.core import is needed.
_RECONSTRUCT = np.empty(0).__reduce__()[0]  # protocols 2-4
_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]  # protocol 5 (Python 3.14's default)
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the official files (numpy 1)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # files numpy 2 writes
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside ALLOWED_GLOBALS."""


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; any other global is refused."""

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise RefusedGlobal(f"{module}.{name}") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def read_pickled_dict(path: Path, expected: str) -> dict:
    """The dict pickled in ``path`` (str keys), read with ArrayUnpickler; DataUnavailable otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataUnavailable(f"could not read {path}: {err.strerror or _one_line(err)}") from err
    try:
        # Everything is read first: a length field in a damaged file cannot make the
        # unpickler ask the file for more than it holds. latin1 decodes Python 2 strings.
        obj = ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except RefusedGlobal as err:
        raise DataUnavailable(
            f"{path}: refused to load the global {err} (a CIFAR file holds only arrays, lists, "
            f"strings and numbers); nothing in it was run, and it is not used"
        ) from None
    except Exception as err:  # the unpickler runs no code here: any error means a damaged file
        raise DataUnavailable(f"{path} is not a readable pickle of {expected} ({_one_line(err)})") from None
    if not isinstance(obj, dict):
        raise DataUnavailable(f"{path}: expected a pickled dict with {expected}, got {_describe(obj)}")
    keys = {}
    for key, value in obj.items():
        if isinstance(key, bytes):  # written with bytes keys (Python 3, b"data")
            key = key.decode("latin-1")
        if not isinstance(key, str):
            raise DataUnavailable(f"{path}: expected a dict with string keys ({expected}), got key {key!r}")
        keys[key] = value
    return keys


def _require(path: Path, d: dict, keys: tuple[str, ...], expected: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        found = ", ".join(sorted(map(repr, d))[:8]) or "none"
        raise DataUnavailable(
            f"{path}: expected a dict with {expected}; missing {', '.join(map(repr, missing))} (keys: {found})"
        )


def read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """(images N x 3072 uint8, labels) of one batch file, checked."""
    expected = f"'data' (an N x 3072 array of uint8 pixels) and {label_key!r} (N class ids)"
    d = read_pickled_dict(path, expected)
    _require(path, d, ("data", label_key), expected)
    data, labels = d["data"], d[label_key]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or len(data) == 0:
        raise DataUnavailable(f"{path}: 'data' must be an N x 3072 array of pixels, got {_describe(data)}")
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu" or data.min() < 0 or data.max() > 255:
            raise DataUnavailable(f"{path}: 'data' must hold pixels 0-255, got {_describe(data)}")
        data = data.astype(np.uint8)
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)) or not all(
        isinstance(y, (int, np.integer)) and not isinstance(y, bool) for y in labels
    ):
        raise DataUnavailable(f"{path}: {label_key!r} must be a list of class ids, got {_describe(labels)}")
    labels = [int(y) for y in labels]
    if len(labels) != len(data):
        raise DataUnavailable(f"{path}: {len(data)} images but {len(labels)} {label_key!r}")
    bad = next((i for i, y in enumerate(labels) if not 0 <= y < num_classes), None)
    if bad is not None:
        raise DataUnavailable(
            f"{path}: {label_key}[{bad}] is {labels[bad]}, outside the {num_classes} classes 0-{num_classes - 1}"
        )
    return data, labels


def read_cifar_names(path: Path, names_key: str, num_classes: int) -> list[str]:
    expected = f"{names_key!r} (the {num_classes} class names)"
    d = read_pickled_dict(path, expected)
    _require(path, d, (names_key,), expected)
    names = d[names_key]
    if isinstance(names, (list, tuple)):
        names = [n.decode("latin-1") if isinstance(n, bytes) else n for n in names]
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
        raise DataUnavailable(
            f"{path}: {names_key!r} must be a list of {num_classes} strings, got {_describe(names)}"
        )
    return names


class CifarImages(Dataset):
    """``(PIL image, label)`` pairs of batch files, as torchvision's CIFAR classes give them."""

    def __init__(self, data: np.ndarray, labels: list[int], classes: list[str]):
        self.data = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # N x 32 x 32 x RGB
        self.targets, self.classes = labels, classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return Image.fromarray(self.data[i]), self.targets[i]


def read_cifar(spec: CifarFiles, where: Path, names: tuple[str, ...], classes: list[str]) -> CifarImages:
    batches = [read_cifar_batch(where / name, spec.label_key, spec.num_classes) for name in names]
    data = np.concatenate([d for d, _ in batches])
    return CifarImages(data, [y for _, labels in batches for y in labels], classes)


def _cifar(name: str, data_dir, download: bool, val_fraction: float) -> DataBundle:
    spec = CIFAR[name]
    root = Path(data_dir or "data").expanduser()
    where = root / spec.folder
    files = (*spec.train, *spec.test, spec.meta)
    if download and not all((where / f).is_file() for f in files):
        try:  # checks the archive's md5 before extracting it
            download_and_extract_archive(
                CIFAR_URL + spec.archive, str(root), filename=spec.archive, md5=spec.md5
            )
        except (OSError, RuntimeError, tarfile.TarError) as err:  # no network, or a corrupted archive
            raise DataUnavailable(
                f"could not download {spec.title} into {root} ({_one_line(err)}); put the extracted "
                f"{spec.folder}/ folder there by hand"
            ) from err
    if not all((where / f).is_file() for f in files):
        hint = "" if download else " or pass --download on a machine with internet access"
        raise DataUnavailable(
            f"{spec.title} not found under {root}: expected {where}/{{{','.join(files)}}}; "
            f"extract {spec.archive} (https://www.cs.toronto.edu/~kriz/cifar.html) into {root}{hint}"
        )
    classes = read_cifar_names(where / spec.meta, spec.names_key, spec.num_classes)
    train, test = (read_cifar(spec, where, names, classes) for names in (spec.train, spec.test))
    return bundle_from_splits(
        name,
        train,
        test,
        img_size=32,
        num_classes=spec.num_classes,
        class_names=classes,
        val_fraction=val_fraction,
    )


@register_dataset("cifar10")
def cifar10(*, data_dir=None, download: bool = False, val_fraction: float = 0.1, **_) -> DataBundle:
    """CIFAR-10: 50,000 training / 10,000 test 32x32 colour images, ten classes."""
    return _cifar("cifar10", data_dir, download, val_fraction)


@register_dataset("cifar100")
def cifar100(*, data_dir=None, download: bool = False, val_fraction: float = 0.1, **_) -> DataBundle:
    """CIFAR-100: 50,000 training / 10,000 test 32x32 colour images, 100 fine classes."""
    return _cifar("cifar100", data_dir, download, val_fraction)


# -- Tiny ImageNet ----------------------------------------------------------------------------
class ImageFiles(Dataset):
    """(path, label) pairs, read as RGB (a few Tiny ImageNet images are greyscale)."""

    def __init__(self, samples: list[tuple[Path, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with Image.open(path) as image:
            return image.convert("RGB"), label


def _tiny_imagenet_root(data_dir) -> Path:
    base = Path(data_dir or "data").expanduser()
    for root in (base, base / "tiny-imagenet-200"):
        if (root / "wnids.txt").is_file():
            return root
    raise DataUnavailable(
        f"Tiny ImageNet not found under {base}: expected {base}/tiny-imagenet-200/ with wnids.txt, "
        "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt "
        "(unzip tiny-imagenet-200.zip from http://cs231n.stanford.edu/tiny-imagenet-200.zip there)"
    )


@register_dataset("tiny-imagenet")
def tiny_imagenet(*, data_dir=None, val_fraction: float = 0.1, download: bool = False, **_) -> DataBundle:
    """Tiny ImageNet: 200 classes of 64x64 images, 500 training and 50 validation images each.

    The official validation images (labels in val/val_annotations.txt) are our test split;
    our validation split is held out of the training images. It is never downloaded.
    """
    if download:
        raise DataUnavailable(
            "Tiny ImageNet is not downloaded by afmp; unzip tiny-imagenet-200.zip into --data-dir"
        )
    root = _tiny_imagenet_root(data_dir)
    wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
    label = {w: i for i, w in enumerate(wnids)}
    train = [
        (path, label[w]) for w in wnids for path in sorted((root / "train" / w / "images").glob("*.JPEG"))
    ]
    annotations = root / "val" / "val_annotations.txt"
    if not train or not annotations.is_file():
        raise DataUnavailable(
            f"Tiny ImageNet under {root} is incomplete: need train/<wnid>/images/*.JPEG for the "
            f"{len(wnids)} classes of wnids.txt and val/val_annotations.txt"
        )
    test = []
    for line in annotations.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        if fields[1] not in label:
            raise DataUnavailable(f"{annotations}: class {fields[1]!r} of {fields[0]} is not in wnids.txt")
        test.append((root / "val" / "images" / fields[0], label[fields[1]]))
    names = {}  # words.txt, when present: "wnid<TAB>readable name"
    if (root / "words.txt").is_file():
        lines = (root / "words.txt").read_text().splitlines()
        names = dict(line.split("\t", 1) for line in lines if "\t" in line)
    return bundle_from_splits(
        "tiny-imagenet",
        ImageFiles(train),
        ImageFiles(test),
        img_size=64,
        num_classes=len(wnids),
        class_names=[names.get(w, w) for w in wnids],
        val_fraction=val_fraction,
    )
