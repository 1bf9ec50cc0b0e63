"""``--dataset imagefolder`` (afmp.data.folder) and its preprocessing (afmp.data.preprocess),
on small folders of real PNG and JPEG files written here with Pillow."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import afmp_cli as cli
from afmp.data import build_dataset
from afmp.data import folder as folder_module
from afmp.data.preprocess import Preprocess, open_image
from afmp.utils.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


def save(path, pixels):
    """A real image file of ``pixels`` (H x W x 3 or H x W uint8), PNG or JPEG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path, quality=95)
    return path


def solid(rgb, size=(2, 2)):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (*size, 3)).copy()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AFMP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_center_crop_keeps_the_middle_and_normalises_per_channel():
    # 6 wide, 2 high: the shorter side is already 2, so the middle two columns are kept.
    image = Image.fromarray(np.array([[0, 0, 51, 102, 0, 0]] * 2, dtype=np.uint8)).convert("RGB")
    pre = Preprocess(2, 3, (0.1, 0.2, 0.3), (0.5, 0.5, 0.25), "center", "nearest")
    expected = torch.tensor([[0.2, 0.6], [0.0, 0.4], [-0.4, 0.4]])[:, None, :].expand(3, 2, 2)
    assert torch.allclose(pre(image), expected, atol=1e-6)


def test_squash_resizes_both_sides_and_grey_models_read_one_channel():
    image = Image.fromarray(np.array([[10, 20, 30, 40]] * 2, dtype=np.uint8))
    assert Preprocess(2, 1, (0.0,), (1.0,), "squash", "nearest").pixels(image).tolist() == [
        [[20, 40], [20, 40]]
    ]
    assert Preprocess(2, 1, (0.0,), (1.0,), "center", "nearest").pixels(image).tolist() == [
        [[20, 30], [20, 30]]
    ]


def test_sixteen_bit_grey_is_scaled_to_eight_bits_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 255, 256, 65535]], dtype=np.uint16)).save(path)
    pixels = Preprocess(4, 1, (0.0,), (1.0,), "squash", "nearest").pixels(open_image(path))
    assert pixels.tolist() == [[[0, 0, 1, 255]] * 4]  # the high byte of each; rows repeated


def test_mean_and_std_are_the_training_images_and_computed_once(tmp_path, cache, monkeypatch):
    root = tmp_path / "d"
    # Training pixels (R, G, B) / 255: a: (1,0,0), (0,0,0); b: (1,1,1), (0,1,0); four pixels each.
    for name, rgb in (
        ("a/1.png", (255, 0, 0)),
        ("a/2.png", (0, 0, 0)),
        ("b/1.png", (255, 255, 255)),
        ("b/2.png", (0, 255, 0)),
    ):
        save(root / "train" / name, solid(rgb))
    for split in ("val", "test"):  # other colours, which must not count
        save(root / split / "a" / "x.png", solid((9, 99, 200)))
        save(root / split / "b" / "x.png", solid((70, 7, 255)))
    data = build_dataset("imagefolder", data_dir=str(root), img_size=2)
    # Unbiased std over 16 pixels: R and G hold eight 1s and eight 0s, B four 1s.
    assert data.mean == pytest.approx((0.5, 0.5, 0.25), abs=1e-12)
    assert data.std == pytest.approx(((4 / 15) ** 0.5, (4 / 15) ** 0.5, 0.2**0.5), abs=1e-12)
    assert data.class_names == ["a", "b"] and data.model_args == {
        "img_size": 2,
        "in_chans": 3,
        "num_classes": 2,
    }
    assert len(list((cache / "imagefolder").iterdir())) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder_module, "check_and_measure", no_decoding)
    assert build_dataset("imagefolder", data_dir=str(root), img_size=2).mean == data.mean
    save(root / "train" / "a" / "2.png", solid((0, 0, 255)))  # a changed file is checked again
    with pytest.raises(AssertionError, match="decoded again"):
        build_dataset("imagefolder", data_dir=str(root), img_size=2)


def test_missing_val_and_test_are_held_out_of_train_fixed_and_stratified(tmp_path):
    root = tmp_path / "d"
    for c, rgb in enumerate(((200, 0, 0), (0, 200, 0), (0, 0, 200))):
        for i in range(10):
            save(root / "train" / f"c{c}" / f"{i}.png", solid(rgb))
    splits = {}
    for seed in (0, 5):
        data = build_dataset("imagefolder", data_dir=str(root), img_size=2, seed=seed, val_fraction=0.1)
        splits[seed] = {s: [str(p) for p, _ in getattr(data, s).samples] for s in ("train", "val", "test")}
        for split, per_class in (("train", 7), ("val", 1), ("test", 2)):
            labels = [y for _, y in getattr(data, split).samples]
            assert np.bincount(labels, minlength=3).tolist() == [per_class] * 3, split
    assert splits[0] == splits[5]  # the run's seed does not move the held-out images
    assert not set(splits[0]["train"]) & (set(splits[0]["val"]) | set(splits[0]["test"]))
    held = data.info["held_out_of_train"]
    assert [str(root / p) for p in held["val"]] == splits[0]["val"]  # recorded, for results.json
    assert [str(root / p) for p in held["test"]] == splits[0]["test"]


def test_a_grey_image_among_colour_ones_is_converted_and_said_once(tmp_path, capsys):
    root = tmp_path / "d"
    save(root / "train" / "a" / "1.png", solid((255, 0, 0)))
    save(root / "train" / "a" / "g1.png", np.full((2, 2), 102))
    save(root / "train" / "b" / "g2.png", np.full((2, 2), 51))
    save(root / "train" / "b" / "1.png", solid((0, 0, 255)))
    data = build_dataset(
        "imagefolder", data_dir=str(root), img_size=2, val_fraction=0.0, test_fraction=0.0, flip=False
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if "grey" in line]
    assert lines == [f"imagefolder: 2 grey image(s) read as RGB (the first: {root / 'train/a/g1.png'})"]
    grey = data.train.samples.index((root / "train" / "a" / "g1.png", 0))
    x, _ = data.train[grey]
    raw = x * torch.tensor(data.std)[:, None, None] + torch.tensor(data.mean)[:, None, None]
    assert torch.allclose(raw, torch.full((3, 2, 2), 0.4), atol=1e-6)  # 102 / 255 in every channel
    for path in root.rglob("1.png"):  # all grey: one channel
        save(path, np.full((2, 2), 7))
    data = build_dataset("imagefolder", data_dir=str(root), img_size=2, val_fraction=0.0, test_fraction=0.0)
    assert data.model_args["in_chans"] == 1


def good_folder(root):
    for c, rgb in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        for split in ("train", "test"):
            for i in range(3):
                save(root / split / c / f"{i}.jpg", solid(rgb, (6, 6)))
    return root


def truncate(root):
    path = root / "train" / "dog" / "big.jpg"
    save(path, np.random.default_rng(0).integers(0, 255, (64, 64, 3)))
    path.write_bytes(path.read_bytes()[:700])
    return path


BREAKAGES = {
    "empty class folder": (
        lambda r: (r / "train" / "bird").mkdir() or r / "train" / "bird",
        "empty class folder",
    ),
    "not an image": (
        lambda r: (
            (r / "train" / "cat" / "notes.png").write_text("hello") and r / "train" / "cat" / "notes.png"
        ),
        "not an image",
    ),
    "truncated JPEG": (truncate, "truncated"),
    "one class": (
        lambda r: (
            [p.unlink() for p in (r / "train" / "dog").iterdir()]
            and (r / "train" / "dog").rmdir()
            or r / "train"
        ),
        "one class folder",
    ),
    "class only in test": (
        lambda r: save(r / "test" / "fox" / "0.png", solid((0, 0, 0))).parent,
        "is not in",
    ),
    "file outside a class folder": (
        lambda r: save(r / "train" / "stray.png", solid((0, 0, 0))),
        "not in a class folder",
    ),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_bad_folders_are_one_line_errors_naming_the_file_with_nothing_written(tmp_path, cache, capsys, case):
    root = good_folder(tmp_path / "d")
    build_dataset("imagefolder", data_dir=str(root), img_size=4)  # the folder was good before
    cached = sorted((cache / "imagefolder").iterdir())
    breaks, says = BREAKAGES[case]
    named = breaks(root)
    out = tmp_path / "run"
    argv = [
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(root),
        "--data-opt",
        "img_size=4",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("afmp train: error: ") and says in err
    assert str(named) in err
    assert not out.exists() and sorted((cache / "imagefolder").iterdir()) == cached


def test_bad_options_are_refused():
    with pytest.raises(UsageError, match="imagefolder needs --data-dir"):
        build_dataset("imagefolder")
    with pytest.raises(UsageError, match="crop_mode must be one of center, squash"):
        Preprocess(4, 3, (0.5,) * 3, (0.5,) * 3, "border")
    with pytest.raises(UsageError, match=r"std must be one finite, positive number or 3 of them"):
        folder_module.check_channel_stats("std", [1, 0, 1], 3)


def test_given_mean_and_std_replace_the_measured_ones(tmp_path):
    root = good_folder(tmp_path / "d")
    data = build_dataset("imagefolder", data_dir=str(root), img_size=4, mean=0.5, std=[0.1, 0.2, 0.4])
    assert data.mean == (0.5, 0.5, 0.5) and data.std == (0.1, 0.2, 0.4)
    x, _ = data.test[0]  # cat: (200, 30, 30)
    assert torch.allclose(
        x[:, 0, 0], torch.tensor([(200 / 255 - 0.5) / 0.1, (30 / 255 - 0.5) / 0.2, (30 / 255 - 0.5) / 0.4])
    )
    assert json.loads(json.dumps(data.pretrained_cfg()))["label_names"] == ["cat", "dog"]
