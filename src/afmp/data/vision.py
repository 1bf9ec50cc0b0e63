"""Image data sets read from disk: CIFAR-10, CIFAR-100 (torchvision's classes) and Tiny ImageNet.

Nothing is downloaded unless asked (``--download``); with no files, a DataUnavailable
says where to put them. Each set keeps its official test split as our test split and
holds a validation split out of the training files (fixed ``split_seed``, so every run
and seed validates on the same images). Training images get the usual augmentation
(random crop with 4-pixel padding, horizontal flip); every split is normalised with the
data set's own per-channel statistics.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from afmp.data import DataBundle, DataUnavailable, register_dataset
from afmp.data.images import split_indices

# Per-channel mean and std of each data set's training images (the values in common use).
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}


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
def _presence_only(cls):
    """``cls`` with its per-file md5 checks replaced by presence checks.

    torchvision checks every extracted batch file against the md5 of the official
    release, so files a user (or a test) wrote in the same format are refused. Here the
    local files are trusted as they are; a download is still verified, because
    ``download()`` checks the archive's own md5 before extracting it.
    """
    return type(
        cls.__name__,
        (cls,),
        {
            "train_list": [[name, None] for name, _ in cls.train_list],
            "test_list": [[name, None] for name, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        },
    )


CIFAR = {
    "cifar10": (_presence_only(datasets.CIFAR10), 10, "CIFAR-10", "cifar-10-python.tar.gz"),
    "cifar100": (_presence_only(datasets.CIFAR100), 100, "CIFAR-100", "cifar-100-python.tar.gz"),
}


def _cifar(name: str, data_dir, download: bool, val_fraction: float) -> DataBundle:
    cls, num_classes, title, archive = CIFAR[name]
    root = Path(data_dir or "data").expanduser()
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    where = root / cls.base_folder
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        hint = "" if download else " or pass --download on a machine with internet access"
        raise DataUnavailable(
            f"{title} not found under {root}: expected {where}/{{{','.join(files)}}}; "
            f"extract {archive} (https://www.cs.toronto.edu/~kriz/cifar.html) into {root}{hint}"
        ) from err
    except OSError as err:  # a failed download (no network) or unreadable files
        raise DataUnavailable(
            f"could not read or download {title} into {root} ({err}); put the extracted "
            f"{cls.base_folder}/ folder there by hand"
        ) from err
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        raise DataUnavailable(f"{title} files under {where} are not readable batches ({err!r})") from err
    return bundle_from_splits(
        name,
        train,
        test,
        img_size=32,
        num_classes=num_classes,
        class_names=train.classes,
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
