"""CIFAR-10/100 and Tiny ImageNet loaders, on tiny files written here in the real on-disk formats.

The files go through exactly what a user runs (build_dataset / afmp train --data-dir).
Local CIFAR batch files are not checked against the official md5s (a download is, through
the archive's md5), which is what lets these tiny batches load; they are read with a
restricted unpickler (tests/test_data_safety.py).
"""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import afmp_cli as cli
from afmp.data import DataUnavailable, build_dataset
from afmp.data.vision import STATS

N_TRAIN_PER_BATCH, N_TEST = 4, 6  # CIFAR-10: 5 batches of 4 = 20 training images


def _images(rng, n):
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def _dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))  # as the official files (written by Python 2)


@pytest.fixture
def cifar10_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for b in range(1, 6):
        data, labels = (
            _images(rng, N_TRAIN_PER_BATCH),
            [int(x) for x in rng.integers(0, 10, N_TRAIN_PER_BATCH)],
        )
        _dump(folder / f"data_batch_{b}", {"data": data, "labels": labels})
        batches[b] = (data, labels)
    test_data, test_labels = _images(rng, N_TEST), list(range(N_TEST))
    _dump(folder / "test_batch", {"data": test_data, "labels": test_labels})
    _dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return tmp_path, batches, (test_data, test_labels)


@pytest.fixture
def cifar100_dir(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = {
        "data": _images(rng, 10),
        "fine_labels": [99, 0, 5, 7, 1, 2, 3, 4, 6, 8],
        "coarse_labels": [0] * 10,
    }
    test = {"data": _images(rng, 3), "fine_labels": [42, 99, 0], "coarse_labels": [0] * 3}
    _dump(folder / "train", train)
    _dump(folder / "test", test)
    _dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["c"]})
    return tmp_path, train, test


def _normalised(flat_row, name):
    mean, std = STATS[name]
    x = torch.from_numpy(flat_row.reshape(3, 32, 32).astype(np.float32)) / 255
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_cifar10_splits_labels_and_normalisation(cifar10_dir):
    root, batches, (test_data, test_labels) = cifar10_dir
    bundle = build_dataset("cifar10", data_dir=str(root), val_fraction=0.25)
    assert bundle.model_args == {"img_size": 32, "in_chans": 3, "num_classes": 10}
    assert bundle.class_names == [f"class{i}" for i in range(10)]
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (15, 5, N_TEST)
    # The validation split is held out of the 20 training images, disjoint from training.
    assert sorted([*bundle.train.indices, *bundle.val.indices]) == list(range(20))
    # Test split: the official test batch, in order, with the data set's own normalisation.
    for i in range(N_TEST):
        x, y = bundle.test[i]
        assert y == test_labels[i]
        torch.testing.assert_close(x, _normalised(test_data[i], "cifar10"), atol=1e-6, rtol=0)
    # Validation images come from the training batches (batch order, then row order), unaugmented.
    all_train = np.concatenate([batches[b][0] for b in range(1, 6)])
    all_labels = sum((batches[b][1] for b in range(1, 6)), [])
    j = int(bundle.val.indices[0])
    x, y = bundle.val[0]
    assert y == all_labels[j]
    torch.testing.assert_close(x, _normalised(all_train[j], "cifar10"), atol=1e-6, rtol=0)


def test_cifar10_training_augmentation_is_padded_crop_and_flip(cifar10_dir):
    root, batches, _ = cifar10_dir
    bundle = build_dataset("cifar10", data_dir=str(root), val_fraction=0.25)
    all_train = np.concatenate([batches[b][0] for b in range(1, 6)])
    mean, std = (torch.tensor(v)[:, None, None] for v in STATS["cifar10"])
    j = int(bundle.train.indices[0])
    raw = torch.from_numpy(all_train[j].reshape(3, 32, 32).astype(np.float32)) / 255
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))  # RandomCrop pads with black before normalising
    candidates = {
        (top, left, flip): ((c.flip(-1) if flip else c) - mean) / std
        for top in range(9)
        for left in range(9)
        for flip in (False, True)
        for c in [padded[:, top : top + 32, left : left + 32]]
    }
    torch.manual_seed(0)
    matched = []
    for _ in range(30):  # every draw is exactly one of the 162 crops-and-flips...
        x = bundle.train[0][0]
        key, error = min(((k, float((x - c).abs().max())) for k, c in candidates.items()), key=lambda t: t[1])
        assert error < 1e-6
        matched.append(key)
    # ...and the draws reach the full 4-pixel shift both ways, flipped and not.
    assert {0, 8} <= {t for t, _, _ in matched} | {l for _, l, _ in matched}
    assert {f for _, _, f in matched} == {False, True}


def test_cifar100_fine_labels(cifar100_dir):
    root, train, test = cifar100_dir
    bundle = build_dataset("cifar100", data_dir=str(root), val_fraction=0.2)
    assert bundle.model_args["num_classes"] == 100
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 2, 3)
    assert [bundle.test[i][1] for i in range(3)] == [42, 99, 0]
    torch.testing.assert_close(bundle.test[1][0], _normalised(test["data"][1], "cifar100"), atol=1e-6, rtol=0)
    assert sorted([bundle.train[i][1] for i in range(8)] + [bundle.val[i][1] for i in range(2)]) == sorted(
        train["fine_labels"]
    )


def test_cifar_offline_without_files_says_where_to_put_them(tmp_path, capsys):
    with pytest.raises(DataUnavailable) as err:
        build_dataset("cifar100", data_dir=str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "cifar-100-python") in message and "--download" in message
    # Through the command line: one clean line on stderr, exit status 2, no traceback.
    status = cli.main(
        ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]
    )
    err_text = capsys.readouterr().err
    assert status == 2
    assert err_text.startswith("afmp train: error: CIFAR-10 not found under") and "Traceback" not in err_text
    assert err_text.count("\n") == 1


def test_train_runs_on_cifar10_files(cifar10_dir, tmp_path):
    root, _, _ = cifar10_dir
    out = tmp_path / "run"
    args = ["train", "--dataset", "cifar10", "--data-dir", str(root), "--epochs", "1", "--batch-size", "8"]
    args += [
        "--out",
        str(out),
        "-o",
        "d_model=16",
        "-o",
        "num_layers=1",
        "-o",
        "k_dim=8",
        "-o",
        "score_hidden=8",
    ]
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "cifar10" and results["config"]["resolved_model"]["config"]["img_size"] == 32
    assert 0 <= results["test_accuracy"] <= 100


# -- Tiny ImageNet --------------------------------------------------------------------------
COLOURS = {"n01443537": (220, 20, 20), "n09999999": (20, 20, 220)}


def _write_tiny_imagenet(base):
    root = base / "tiny-imagenet-200"
    wnids = list(COLOURS)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn09999999\tblue thing\n")
    for w in wnids:
        folder = root / "train" / w / "images"
        folder.mkdir(parents=True)
        for k in range(5):
            Image.new("RGB", (64, 64), COLOURS[w]).save(folder / f"{w}_{k}.JPEG")
        (root / "train" / w / f"{w}_boxes.txt").write_text("")  # present in the real layout, unused
    # Official validation images (our test split): labels only in val_annotations.txt.
    annotations = []
    for k, w in enumerate([wnids[1], wnids[0], wnids[1]]):
        name = f"val_{k}.JPEG"
        Image.new("RGB", (64, 64), COLOURS[w]).save(root / "val" / "images" / name)
        annotations.append(f"{name}\t{w}\t0\t0\t63\t63")
    Image.new("L", (64, 64), 128).save(root / "val" / "images" / "val_3.JPEG")  # a greyscale one
    annotations.append(f"val_3.JPEG\t{wnids[0]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return root


@pytest.mark.parametrize("point_at_root", [False, True])
def test_tiny_imagenet_layout(tmp_path, point_at_root):
    root = _write_tiny_imagenet(tmp_path)
    bundle = build_dataset(
        "tiny-imagenet", data_dir=str(root if point_at_root else tmp_path), val_fraction=0.2
    )
    assert bundle.model_args == {"img_size": 64, "in_chans": 3, "num_classes": 2}
    assert bundle.class_names == ["goldfish, Carassius auratus", "blue thing"]
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 2, 4)
    assert [bundle.test[i][1] for i in range(4)] == [1, 0, 1, 0]
    mean, std = (torch.tensor(v)[:, None, None] for v in STATS["tiny-imagenet"])
    for i in range(3):  # the colour matches the annotated class (JPEG is close to exact on flat colour)
        x, y = bundle.test[i]
        rgb = (x * std + mean).mean(dim=(1, 2)) * 255
        assert torch.allclose(rgb, torch.tensor(COLOURS[list(COLOURS)[y]], dtype=rgb.dtype), atol=4)
    assert bundle.test[3][0].shape == (3, 64, 64)  # greyscale read as RGB
    for split in (bundle.train, bundle.val):  # training images keep their folder's class
        for i in range(len(split)):
            x, y = split[i]
            centre = (x[:, 28:36, 28:36] * std + mean).mean(dim=(1, 2)) * 255
            assert int(centre.argmax()) == (0 if y == 0 else 2)


def test_tiny_imagenet_missing_or_incomplete(tmp_path):
    with pytest.raises(DataUnavailable, match="wnids.txt"):
        build_dataset("tiny-imagenet", data_dir=str(tmp_path))
    root = _write_tiny_imagenet(tmp_path)
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataUnavailable, match="val_annotations.txt"):
        build_dataset("tiny-imagenet", data_dir=str(tmp_path))
