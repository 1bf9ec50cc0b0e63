"""The data set registry: DataBundle, ``register_dataset`` and ``build_dataset``.

Kept apart from the package's ``__init__`` (which imports every loader so that it
registers itself), so that the loaders import this module and not their package.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from afmp.utils.errors import UsageError

DATASETS: dict[str, Callable[..., DataBundle]] = {}


@dataclass
class DataBundle:
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    model_args: dict  # e.g. {"img_size": 8, "in_chans": 1, "num_classes": 10}
    class_names: list[str] | None = None
    mean: tuple[float, ...] | None = None  # normalisation, so images can be shown again
    std: tuple[float, ...] | None = None
    collate_fn: Callable | None = None
    info: dict = field(default_factory=dict)
    # How files become inputs, in timm's pretrained_cfg keys (crop_mode, interpolation...):
    # for a data set read from image files, so that `afmp predict` reads new ones the same way.
    input_cfg: dict = field(default_factory=dict)

    def pretrained_cfg(self) -> dict:
        """What a model trained on this data keeps with its weights (timm's pretrained_cfg keys):
        the normalisation, the class names and how files are resized."""
        out = dict(self.input_cfg)
        if self.mean is not None and self.std is not None:
            out["mean"], out["std"] = list(self.mean), list(self.std)
        if self.class_names is not None:
            out["label_names"] = list(self.class_names)
        return out


class DataUnavailable(UsageError):
    """The files a data set needs are not there; the message says where to put them."""


def register_dataset(name: str):
    def decorator(fn: Callable[..., DataBundle]):
        if name in DATASETS:
            raise ValueError(f"data set {name!r} is already registered")
        DATASETS[name] = fn
        return fn

    return decorator


def list_datasets() -> list[str]:
    return sorted(DATASETS)


# Every loader is handed these; one that has no use for an option ignores it.
COMMON_OPTIONS = ("data_dir", "download", "val_fraction", "seed")


def dataset_options(name: str) -> tuple[list[str], bool]:
    """(the options loader ``name`` takes besides COMMON_OPTIONS, whether it takes others too:
    a loader with **options of its own, not a ``**_`` that swallows them, checks those itself)."""
    if name not in DATASETS:
        raise UsageError(f"unknown data set {name!r}; available: {', '.join(list_datasets())}")
    params = inspect.signature(DATASETS[name]).parameters.values()
    own = [
        p.name
        for p in params
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in COMMON_OPTIONS
    ]
    return own, any(p.kind == p.VAR_KEYWORD and p.name != "_" for p in params)


def build_dataset(name: str, **options) -> DataBundle:
    """Build data set ``name``; ``options`` as the loader takes (data_dir, download, val_fraction...)."""
    own, forwards = dataset_options(name)
    unknown = sorted(set(options) - set(own) - set(COMMON_OPTIONS))
    if unknown and not forwards:
        raise UsageError(
            f"data set {name!r} has no option {', '.join(unknown)}; its options: {', '.join(own) or 'none'}"
        )
    return DATASETS[name](**options)
