"""mnist5k-superpixels (afmp.data.points.superpixels): SLIC sets of real-format digits."""

import numpy as np
import pytest
import torch

from afmp.data import DataUnavailable, build_dataset
from afmp.data.points import superpixels as sp
from test_mnist5k import csv_lines, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")


def digit_rows(n: int = 20):
    """n 28x28 digits of classes 0-4: a bright bar whose place and length depend on the row."""
    rows = []
    for i in range(n):
        image = np.zeros((28, 28), dtype=int)
        top = 4 + (i % 5) * 3
        image[top : top + 3, 5 : 10 + i % 7 * 2] = 255
        image[20:24, 3 + i % 4 : 9 + i % 4] = 128
        rows.append((i % 5, {p: int(v) for p, v in enumerate(image.ravel()) if v}))
    return rows


@pytest.fixture
def digits(tmp_path, monkeypatch):
    monkeypatch.setenv("AFMP_CACHE", str(tmp_path / "cache"))
    return write_csv(tmp_path / "digits.csv.gz", csv_lines(digit_rows()))


def test_a_superpixel_is_its_segments_mean_intensity_and_centroid():
    from skimage.segmentation import slic

    rng = np.random.default_rng(0)
    image = np.clip(rng.random((28, 28)) * 0.2 + (np.arange(28) >= 14) * 0.7, 0, 1)
    features, positions = sp.superpixels(image, 12, 0.25)
    labels = slic(image, n_segments=12, compactness=0.25, channel_axis=None, start_label=0)
    expected = []
    for s in np.unique(labels):  # by hand: every pixel of segment s
        r, c = np.nonzero(labels == s)
        expected.append([image[r, c].mean(), (r.mean() + 0.5) / 28, (c.mean() + 0.5) / 28])
    np.testing.assert_allclose(features, np.array(expected), rtol=1e-6)
    np.testing.assert_array_equal(positions, features[:, 1:])


def test_the_sets_keep_mnist5ks_splits_and_come_back_from_a_checked_cache(digits, capsys):
    bundle = build_dataset("mnist5k-superpixels", path=str(digits), segments=20)
    grid = build_dataset("mnist5k", path=str(digits))
    for name in ("train", "val", "test"):
        assert getattr(bundle, name).labels.tolist() == getattr(grid, name).labels.tolist(), name
    assert bundle.model_args["in_features"] == 3 and bundle.collate_fn is not None
    example, _ = bundle.test[0]
    n = example["features"].shape[0]
    assert example["neighbors"].shape == example["mask"].shape == example["length"].shape
    assert example["neighbors"].shape[0] == n and example["mask"].any(1).all()  # no token is cut off
    cache = sp.Path(bundle.info["cache"])
    assert cache.is_file() and cache.with_suffix(".sha256").is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt although the cache is sound")

    original = sp.build_examples
    sp.build_examples = no_rebuild
    try:
        again = build_dataset("mnist5k-superpixels", path=str(digits), segments=20)
    finally:
        sp.build_examples = original
    np.testing.assert_array_equal(again.test[0][0]["length"], example["length"])
    damaged = bytearray(cache.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    cache.write_bytes(bytes(damaged))
    rebuilt = build_dataset("mnist5k-superpixels", path=str(digits), segments=20)
    assert "damaged or incomplete; building it again" in capsys.readouterr().out
    np.testing.assert_allclose(rebuilt.test[0][0]["features"], example["features"], rtol=1e-6)
    # Features standardised with the training split's own statistics, every split alike.
    raw = sp.load_examples(cache)
    train_raw = np.concatenate(
        [
            raw[i]["features"]
            for i in sp.split_indices(20, val_fraction=0.1, test_fraction=0.2, stratify=np.arange(20) % 5)[0]
        ]
    ).astype(np.float64)
    np.testing.assert_allclose(bundle.mean, train_raw.mean(0), rtol=1e-6)
    np.testing.assert_allclose(bundle.std, train_raw.std(0), rtol=1e-6)
    train_now = np.concatenate([e["features"] for e in bundle.train.examples])
    np.testing.assert_allclose(train_now.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(train_now.std(0), 1, atol=1e-5)
    x, y = bundle.collate_fn([bundle.train[i] for i in range(4)])
    assert x["features"].dtype == torch.float32 and y.shape == (4,)


def test_knn_graph_and_bad_options(digits):
    knn = build_dataset("mnist5k-superpixels", path=str(digits), segments=20, graph="knn", k=3)
    example, _ = knn.train[0]
    assert (example["mask"].sum(1) >= 3).all()  # each has at least its own 3 nearest
    with pytest.raises(DataUnavailable, match="graph must be one of delaunay, knn"):
        build_dataset("mnist5k-superpixels", path=str(digits), graph="radius")
    with pytest.raises(DataUnavailable, match="segments >= 2"):
        build_dataset("mnist5k-superpixels", path=str(digits), segments=1)
