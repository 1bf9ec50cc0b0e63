"""Loading data never executes code from the files.

CIFAR batches are pickles, and a pickle can name any callable for the loader to call.
afmp.data.vision reads them with a restricted unpickler: a crafted file is refused
before anything it names is called, a damaged one is a one-line DataUnavailable naming
the file, and the real release format (Python 2, protocol 2) still loads.
"""

import os
import pickle
import struct

import numpy as np
import pytest

import afmp_cli as cli
from afmp.data import DataUnavailable, build_dataset
from afmp.data import vision as vision_data
from test_vision_data import _dump, cifar10_dir, cifar100_dir  # noqa: F401  (fixtures)


class _Payload:
    """Unpickling this calls ``call(*args)``: what a crafted data file would do."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _refused(root, name, *, match=None, **options) -> str:
    with pytest.raises(DataUnavailable, match=match) as err:
        build_dataset(name, data_dir=str(root), **options)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# -- crafted files: refused, and nothing runs ---------------------------------------------------
CRAFTED = {
    "open": lambda target: _Payload(open, str(target), "w"),
    "os.system": lambda target: _Payload(os.system, f"touch '{target}'"),
    "exec": lambda target: _Payload(exec, f"open({str(target)!r}, 'w').close()"),
}


@pytest.mark.parametrize("how", sorted(CRAFTED))
@pytest.mark.parametrize("file", ["data_batch_1", "test_batch", "batches.meta"])
def test_crafted_cifar10_file_is_refused_and_runs_nothing(cifar10_dir, tmp_path, how, file):  # noqa: F811
    root = cifar10_dir[0]
    target = tmp_path / "pwned"
    _dump(root / "cifar-10-batches-py" / file, CRAFTED[how](target))
    message = _refused(root, "cifar10", match="refused to load the global")
    assert str(root / "cifar-10-batches-py" / file) in message
    assert {"open": "open", "os.system": "system", "exec": "exec"}[how] in message
    assert not target.exists()


def test_crafted_object_hidden_inside_a_valid_batch_is_refused(cifar100_dir, tmp_path):  # noqa: F811
    root, train, _ = cifar100_dir
    target = tmp_path / "pwned"
    labels = [*train["fine_labels"][:-1], _Payload(open, str(target), "w")]
    _dump(root / "cifar-100-python" / "train", {**train, "fine_labels": labels})
    message = _refused(root, "cifar100", match="refused to load the global")
    assert str(root / "cifar-100-python" / "train") in message
    assert not target.exists()


def test_crafted_file_through_the_command_line(cifar10_dir, tmp_path, capsys):  # noqa: F811
    root = cifar10_dir[0]
    target = tmp_path / "pwned"
    _dump(root / "cifar-10-batches-py" / "data_batch_3", _Payload(os.system, f"touch '{target}'"))
    args = ["train", "--dataset", "cifar10", "--data-dir", str(root), "--out", str(tmp_path / "run")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "data_batch_3" in err
    assert not target.exists()


# -- damaged files: one line naming the file ---------------------------------------------------
def _valid_pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


GOOD_BATCH = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}
GARBAGE = {
    "random bytes": (np.random.default_rng(0).bytes(4096), "not a readable pickle"),
    "empty file": (b"", "not a readable pickle"),
    "truncated": (_valid_pickle(GOOD_BATCH)[:200], "not a readable pickle"),
    "a list": (_valid_pickle([1, 2, 3]), "expected a pickled dict"),
    "no labels": (_valid_pickle({"data": GOOD_BATCH["data"]}), "missing 'labels'"),
    "int keys": (_valid_pickle({0: 1}), "string keys"),
    "data not an array": (_valid_pickle({**GOOD_BATCH, "data": [[0] * 3072] * 4}), "N x 3072 array"),
    "wrong shape": (_valid_pickle({**GOOD_BATCH, "data": np.zeros((4, 1024), np.uint8)}), "N x 3072"),
    "images as 3-D": (_valid_pickle({**GOOD_BATCH, "data": np.zeros((4, 3, 1024), np.uint8)}), "N x 3072"),
    # protocol 4: at protocol 2, Python 3 writes the empty pixel buffer as bytes(), a refused global
    "no images": (
        pickle.dumps({"data": np.zeros((0, 3072), np.uint8), "labels": []}, protocol=4),
        "N x 3072",
    ),
    "float pixels": (_valid_pickle({**GOOD_BATCH, "data": np.zeros((4, 3072), np.float32)}), "pixels 0-255"),
    "pixel 256": (_valid_pickle({**GOOD_BATCH, "data": np.full((4, 3072), 256, np.int64)}), "pixels 0-255"),
    "labels not a list": (_valid_pickle({**GOOD_BATCH, "labels": "0123"}), "list of class ids"),
    "string labels": (_valid_pickle({**GOOD_BATCH, "labels": ["0", "1", "2", "3"]}), "list of class ids"),
    "too few labels": (_valid_pickle({**GOOD_BATCH, "labels": [0, 1, 2]}), "4 images but 3"),
    "label 10": (_valid_pickle({**GOOD_BATCH, "labels": [0, 1, 10, 3]}), r"labels\[2\] is 10"),
    "label -1": (_valid_pickle({**GOOD_BATCH, "labels": [0, -1, 2, 3]}), r"labels\[1\] is -1"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_damaged_cifar10_batch_is_refused_naming_the_file(cifar10_dir, case):  # noqa: F811
    root = cifar10_dir[0]
    path = root / "cifar-10-batches-py" / "data_batch_2"
    content, expected = GARBAGE[case]
    path.write_bytes(content)
    message = _refused(root, "cifar10", match=expected)
    assert message.startswith(str(path))


@pytest.mark.parametrize(
    "meta, expected",
    [
        ({"fine_label_names": ["only", "three", "names"]}, "list of 100 strings"),
        ({"fine_label_names": list(range(100))}, "list of 100 strings"),
        ({"label_names": [f"c{i}" for i in range(10)]}, "missing 'fine_label_names'"),
    ],
)
def test_damaged_cifar100_meta_is_refused_naming_the_file(cifar100_dir, meta, expected):  # noqa: F811
    root = cifar100_dir[0]
    path = root / "cifar-100-python" / "meta"
    _dump(path, meta)
    assert _refused(root, "cifar100", match=expected).startswith(str(path))


def test_cifar100_fine_label_out_of_range_is_refused(cifar100_dir):  # noqa: F811
    root, _, test = cifar100_dir
    path = root / "cifar-100-python" / "test"
    _dump(path, {**test, "fine_labels": [42, 100, 0]})
    assert _refused(root, "cifar100", match=r"fine_labels\[1\] is 100").startswith(str(path))


# -- valid files: the real format loads, pixels and labels as written ------------------------------
def _py2_pickle(d: dict) -> bytes:
    """``d`` (str keys; uint8 2-D arrays, lists of ints or strings, strings) pickled the way the
    official files are: Python 2's cPickle, protocol 2, numpy 1's ``numpy.core`` globals."""

    def string(s):
        raw = s if isinstance(s, bytes) else s.encode("latin-1")
        return b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<I", len(raw))

    def value(v):
        if isinstance(v, int):
            return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)
        if isinstance(v, (str, bytes)):
            raw = v if isinstance(v, bytes) else v.encode("latin-1")
            return string(raw) + raw
        if isinstance(v, list):
            return b"](" + b"".join(value(x) for x in v) + b"e"
        assert isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 2
        dtype = (
            b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        )
        shape = value(v.shape[0]) + value(v.shape[1]) + b"\x86"
        return (
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            + b"(K\x01"
            + shape
            + dtype
            + b"\x89"
            + value(v.tobytes())
            + b"tb"
        )

    return b"\x80\x02}(" + b"".join(value(k) + value(v) for k, v in d.items()) + b"u."


def _pixels(n):
    """n images, all 0 but for a few pixels whose place in the 3072 row tests the layout."""
    data = np.zeros((n, 3072), np.uint8)
    data[0, [0, 1024, 2048]] = 11, 22, 33  # image 0, row 0, column 0: R, G, B
    data[0, 1 * 32 + 2] = 44  # image 0, row 1, column 2: R
    data[1, 2048 + 31 * 32 + 30] = 255  # image 1, row 31, column 30: B
    return data


def _write_cifar10(root, dump, keys=str):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    k = (lambda s: s.encode()) if keys is bytes else (lambda s: s)
    for b in range(1, 6):
        labels = [b, b + 1] if b < 5 else [9, 0]
        dump(folder / f"data_batch_{b}", {k("batch_label"): f"training batch {b} of 5", k("labels"): labels,
                                          k("data"): _pixels(2), k("filenames"): ["a.png", "b.png"]})  # fmt: skip
    dump(folder / "test_batch", {k("batch_label"): "testing batch 1 of 1", k("labels"): [7, 3, 5],
                                 k("data"): _pixels(3), k("filenames"): ["c.png", "d.png", "e.png"]})  # fmt: skip
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump(folder / "batches.meta", {k("num_cases_per_batch"): 2, k("label_names"): names, k("num_vis"): 3072})


def _check_cifar10(root):
    bundle = build_dataset("cifar10", data_dir=str(root), val_fraction=0.2)
    assert bundle.class_names[:3] == ["airplane", "automobile", "bird"] and bundle.class_names[9] == "truck"
    test = bundle.test.base
    assert len(test) == 3 and [test[i][1] for i in range(3)] == [7, 3, 5]
    image = np.asarray(test[0][0])
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [11, 22, 33] and image[1, 2].tolist() == [44, 0, 0]
    assert int(image.sum()) == 11 + 22 + 33 + 44
    assert np.asarray(test[1][0])[31, 30].tolist() == [0, 0, 255] and int(np.asarray(test[2][0]).sum()) == 0
    train = bundle.train.base  # the five batches in order
    assert [train[i][1] for i in range(10)] == [1, 2, 2, 3, 3, 4, 4, 5, 9, 0]
    assert np.asarray(train[8][0])[0, 0].tolist() == [11, 22, 33]
    assert (len(bundle.train), len(bundle.val)) == (8, 2)


def test_official_format_python2_pickles_load(tmp_path):
    _write_cifar10(tmp_path, lambda path, d: path.write_bytes(_py2_pickle(d)))
    assert (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        in (tmp_path / "cifar-10-batches-py/test_batch").read_bytes()
    )
    _check_cifar10(tmp_path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("keys", [str, bytes])
def test_python3_pickles_load(tmp_path, protocol, keys):
    _write_cifar10(tmp_path, lambda path, d: path.write_bytes(pickle.dumps(d, protocol=protocol)), keys)
    _check_cifar10(tmp_path)


def test_cifar100_fine_labels_and_names(cifar100_dir):  # noqa: F811
    root, _, _ = cifar100_dir
    folder = root / "cifar-100-python"
    _dump(folder / "test", {"data": _pixels(2), "fine_labels": [99, 0], "coarse_labels": [19, 0]})
    _dump(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)]})
    bundle = build_dataset("cifar100", data_dir=str(root))
    assert bundle.class_names[0] == "fine0" and bundle.class_names[99] == "fine99"
    assert [bundle.test.base[i][1] for i in range(2)] == [99, 0]
    assert np.asarray(bundle.test.base[0][0])[0, 0].tolist() == [11, 22, 33]


def test_download_verifies_the_archive_md5(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, root, filename, md5))
        _write_cifar10(tmp_path, lambda path, d: path.write_bytes(_py2_pickle(d)))

    monkeypatch.setattr(vision_data, "download_and_extract_archive", fake_download)
    build_dataset("cifar10", data_dir=str(tmp_path), download=True)
    assert calls == [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            str(tmp_path),
            "cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
        )
    ]
    build_dataset("cifar10", data_dir=str(tmp_path), download=True)  # files present: no second download
    assert len(calls) == 1

    def failing(*args, **kwargs):
        raise RuntimeError("File not found or corrupted.")  # what torchvision raises on an md5 mismatch

    monkeypatch.setattr(vision_data, "download_and_extract_archive", failing)
    message = _refused(
        tmp_path / "elsewhere", "cifar100", match="could not download CIFAR-100", download=True
    )
    assert "corrupted" in message


def test_unpickler_allows_only_array_reconstruction():
    assert set(vision_data.ALLOWED_GLOBALS) == {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
    with pytest.raises(pickle.UnpicklingError, match="refused"):  # bytes only, from latin1 text
        vision_data.ALLOWED_GLOBALS[("_codecs", "encode")]("eJw=", "base64")
