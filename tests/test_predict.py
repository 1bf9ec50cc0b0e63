"""``afmp predict`` (afmp.deploy.predict): a tiny run trained on a folder of real PNG and
JPEG files predicts its own test images exactly as ``afmp eval`` scores them."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import afmp
import afmp_cli as cli
from afmp.data import build_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"blue": (40, 40, 210), "green": (30, 200, 40), "red": (220, 30, 30)}
SMALL_MODEL = ["-o", "d_model=32", "-o", "num_layers=2", "-o", "k_dim=16", "-o", "score_hidden=16"]


def colour_folder(root):
    """Three classes by colour, noisy, of two sizes (10x14 and 12x12: the crop matters), PNG
    and JPEG; test/ holds five clear images of each class and one of another class's colour
    (mislabelled, so a model that learned the colours cannot score 100%)."""
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    for split, n in (("train", 10), ("test", 6)):
        for c, name in enumerate(names):
            for i in range(n):
                colour = COLOURS[names[(c + 1) % 3]] if split == "test" and i == n - 1 else COLOURS[name]
                size = (10, 14) if i % 2 else (12, 12)
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (*size, 3)), 0, 255).astype(np.uint8)
                path = root / split / name / f"{i}.{'png' if i % 3 else 'jpg'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path, quality=90)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(data folder, run directory) of a 2-epoch AFMP on the colour folder; val/ held out of train/."""
    tmp = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AFMP_CACHE", str(tmp / "cache"))
        root, out = colour_folder(tmp / "images"), tmp / "run"
        argv = [
            "train",
            "--model",
            "afmp_tiny",
            *SMALL_MODEL,
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(root),
        ]
        argv += [
            "--data-opt",
            "img_size=8",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--out",
            str(out),
        ]
        assert cli.main(argv) == 0
        yield root, out


def test_predict_scores_the_test_images_exactly_as_eval_does(run, capsys):
    root, out = run
    assert cli.main(["eval", "--checkpoint", str(out), "--batch-size", "7"]) == 0
    evaluated = json.loads((out / "per_class_test.json").read_text())
    assert (
        cli.main(["predict", "--checkpoint", str(out), str(root / "test"), "--out", str(out / "p.json")]) == 0
    )
    predictions = json.loads((out / "p.json").read_text())["predictions"]
    assert len(predictions) == evaluated["samples"] == 18
    names = list(COLOURS)
    confusion = np.zeros((3, 3), dtype=int)
    for row in predictions:
        confusion[names.index(row["file"].split("/")[-2]), row["top"][0]["index"]] += 1
    assert confusion.tolist() == evaluated["confusion"]
    accuracy = 100.0 * np.trace(confusion) / confusion.sum()
    assert accuracy == evaluated["accuracy"] and 0 < accuracy < 100


def test_probabilities_are_the_models_on_the_evaluation_inputs(run):
    root, out = run
    model = afmp.load_checkpoint(out).eval()
    # The run directory names its classes and preprocessing; results.json its held-out images.
    assert model.pretrained_cfg["label_names"] == ["blue", "green", "red"]
    assert model.pretrained_cfg["crop_mode"] == "center"
    held = json.loads((out / "results.json").read_text())["data"]["held_out_of_train"]
    assert len(held["val"]) == 3 and {p.split("/")[1] for p in held["val"]} == set(COLOURS)
    data = build_dataset("imagefolder", data_dir=str(root), img_size=8)
    assert model.pretrained_cfg["mean"] == list(data.mean)
    with torch.no_grad():
        expected = {
            str(p): model(data.test[i][0][None]).softmax(-1)[0] for i, (p, _) in enumerate(data.test.samples)
        }
    assert (
        cli.main(
            [
                "predict",
                "--checkpoint",
                str(out),
                str(root / "test"),
                "--top-k",
                "9",
                "--out",
                str(out / "p.csv"),
            ]
        )
        == 0
    )
    with open(out / "p.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "file",
        "class_1",
        "probability_1",
        "class_2",
        "probability_2",
        "class_3",
        "probability_3",
    ]
    assert sorted(r[0] for r in rows[1:]) == sorted(expected)
    for file, *top in rows[1:]:
        got = {top[j]: float(top[j + 1]) for j in range(0, 6, 2)}
        want = expected[file]
        assert [float(p) for p in top[1::2]] == sorted(got.values(), reverse=True)
        assert got == pytest.approx({n: float(want[i]) for i, n in enumerate(COLOURS)}, abs=1e-6)


def test_bad_inputs_are_one_line_errors_with_nothing_written(run, tmp_path, capsys):
    root, out = run
    broken = tmp_path / "broken.png"
    broken.write_text("not a picture")
    image = next((root / "test" / "red").iterdir())
    notes = tmp_path / "notes"  # a folder without image files
    notes.mkdir()
    (notes / "a.txt").write_text("text")
    cases = [
        ([str(image), "--out", str(tmp_path / "p.txt")], "--out must end in .csv or .json"),
        (
            [str(image), str(broken), "--out", str(tmp_path / "p.csv")],
            f"{broken} is not an image Pillow can read",
        ),
        ([str(tmp_path / "nowhere")], "is neither a file nor a folder"),
        ([str(notes)], f"{notes} holds no image files"),
    ]
    for extra, says in cases:
        assert cli.main(["predict", "--checkpoint", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "notes"]


def test_a_run_that_recorded_no_preprocessing_is_refused_not_guessed(run, tmp_path, capsys):
    _, out = run
    old = tmp_path / "old-run"  # as a run saved before model.json kept its data's statistics
    old.mkdir()
    (old / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    spec = json.loads((out / "model.json").read_text())
    del spec["pretrained_cfg"]
    (old / "model.json").write_text(json.dumps(spec))
    image = next((run[0] / "test" / "red").iterdir())
    assert cli.main(["predict", "--checkpoint", str(old), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.json: the checkpoint records no mean and std" in err
