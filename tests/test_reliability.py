"""Bad input, faults and attacks on a run directory: each gets a clear error or is survived.

- every bad argument: exit code 2, one line on stderr naming what was wrong, no traceback,
  nothing written;
- a kill at each step of writing an epoch's checkpoint, then --resume: the same weights
  as a run never interrupted;
- two writers on one run directory: the second is refused, a dead one's lock reclaimed;
- corrupted, torn or NaN weights: refused on load.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import afmp
import afmp_cli as cli
from afmp.training import rundir
from afmp.training.config import CHECKS
from afmp.training.train import TrainConfig, train
from afmp.utils import files
from afmp.utils.errors import UsageError

TINY = dict(dataset="synthetic", data_opts={"num_samples": 96, "img_size": 16}, batch_size=16, lr=3e-3)
TINY_ARGS = ["--dataset", "synthetic", "--data-opt", "num_samples=96", "--data-opt", "img_size=16"]
TINY_ARGS += ["--batch-size", "16"]
SRC = str(Path(afmp.__file__).parents[1])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig(model="afmp_tiny", epochs=1, out=str(out), **TINY))
    return out


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` and its bytes (what "nothing written" compares)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- bad input: one line, exit 2, nothing written --------------------------------------------
def _yaml(tmp, name, text):
    path = tmp / name
    path.write_text(text)
    return str(path)


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _nan_weights(run: Path) -> None:
    """NaN weights saved with a matching checksum: what a diverged run would write."""
    state = load_file(str(run / "model.safetensors"))
    state[next(iter(state))].fill_(float("nan"))
    save_file(state, str(run / "model.safetensors"))
    spec = json.loads((run / "model.json").read_text())
    spec["sha256"] = rundir.sha256_file(run / "model.safetensors")
    (run / "model.json").write_text(json.dumps(spec))


# (case, argv with {out}/{run}/{tmp}, what to do to the copied run first, words of the message)
TRAIN_CASES = [
    ("malformed yaml", ["--config", "{bad_yaml}"], None, "is not valid YAML"),
    ("sparsity=abc", ["-o", "sparsity=abc"], None, "sparsity of model 'afmp_tiny' must be a finite number"),
    (
        "use_top_down=maybe",
        ["-o", "use_top_down=maybe"],
        None,
        "use_top_down of model 'afmp_tiny' must be true or false",
    ),
    (
        "quoted no",
        ["--config", "{quoted_no}"],
        None,
        "use_top_down of model 'afmp_tiny' must be true or false, got 'no'",
    ),
    (
        "lambda nan",
        ["-o", "lambda_sparse=.nan"],
        None,
        "lambda_sparse of model 'afmp_tiny' must be a finite number",
    ),
    (
        "label smoothing 2",
        ["--label-smoothing", "2"],
        None,
        "label_smoothing (--label-smoothing) must be a number in [0, 1), got 2.0",
    ),
    ("epochs 0", ["--epochs", "0"], None, "epochs must be an integer >= 1, got 0"),
    ("epochs -3", ["--epochs", "-3"], None, "epochs must be an integer >= 1, got -3"),
    ("batch 0", ["--batch-size", "0"], None, "batch_size (--batch-size) must be an integer >= 1, got 0"),
    ("out is a file", ["--out", "{a_file}"], None, "is a file; expected a directory"),
    ("out unwritable", ["--out", "/proc/afmp-run"], None, "cannot write in /proc"),
    ("data option typo", ["--data-opt", "typo=5"], None, "data set 'synthetic' has no option typo"),
    ("resume without a run", ["--resume"], None, "holds no checkpoint to continue"),
    ("resume another width", ["--resume", "-o", "d_model=64"], "copy", "was saved with d_model=128 (now 64)"),
]


@pytest.mark.parametrize("case,argv,prepare,words", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_train_input_is_one_line_exit_2_and_nothing_written(
    case, argv, prepare, words, tmp_path, finished_run, capsys
):
    out = tmp_path / "run"
    if prepare == "copy":
        shutil.copytree(finished_run, out)
    names = {
        "bad_yaml": _yaml(tmp_path, "malformed.yaml", "epochs: [1, 2\n"),
        "quoted_no": _yaml(tmp_path, "quoted.yaml", 'model_opts: {use_top_down: "no"}\n'),
        "a_file": str(tmp_path / "a_file"),
    }
    (tmp_path / "a_file").write_text("not a directory")
    argv = [a.format(**names) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    before = snapshot(tmp_path)
    assert cli.main(["train", *TINY_ARGS, "--epochs", "1", *argv]) == 2  # a later flag wins
    err = capsys.readouterr().err
    assert err.startswith("afmp train: error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err
    assert snapshot(tmp_path) == before  # nothing created, nothing changed


EVAL_CASES = [
    (
        "truncated weights",
        lambda run: _truncate(run / "model.safetensors", 100),
        "does not match the checksum",
    ),
    ("flipped byte", lambda run: _flip_byte(run / "model.safetensors"), "does not match the checksum"),
    ("nan weights", _nan_weights, "holds NaN or infinite weights"),
    ("json truncated", lambda run: _truncate(run / "model.json", 20), "model.json is not readable JSON"),
    ("json a list", lambda run: (run / "model.json").write_text("[1, 2]"), 'expected an object with "model"'),
    (
        "json missing config",
        lambda run: (run / "model.json").write_text('{"model": "afmp_tiny"}'),
        'expected an object with "model"',
    ),
    ("config.yaml malformed", lambda run: (run / "config.yaml").write_text("a: [1\n"), "is not valid YAML"),
]


@pytest.mark.parametrize("case,damage,words", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_damaged_run_is_refused_by_eval_with_one_line(case, damage, words, tmp_path, finished_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run)
    before = snapshot(run)
    assert cli.main(["eval", "--checkpoint", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("afmp eval: error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err
    assert snapshot(run) == before


def test_an_internal_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only UsageError is turned into one line; a ValueError from the loop is a bug."""

    def broken(*args, **kwargs):
        raise ValueError("a bug inside the loop")

    monkeypatch.setattr("afmp.training.run.train_one_epoch", broken)
    with pytest.raises(ValueError, match="a bug inside the loop"):
        cli.main(["train", *TINY_ARGS, "--epochs", "1", "--out", str(tmp_path / "run")])


def test_every_training_setting_is_checked():
    fields = {f for f in TrainConfig.__dataclass_fields__}
    assert set(CHECKS) == fields


def test_results_json_is_strict_json(tmp_path):
    files.write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.5, float("inf")], "c": 2})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard {c}")) == {
        "a": None,
        "b": [1.5, None],
        "c": 2,
    }


def test_an_empty_batch_is_refused():
    model = afmp.create_model("afmp_tiny", img_size=16, patch_size=4)
    with pytest.raises(ValueError, match="expected at least one image"):
        model(torch.zeros(0, 3, 16, 16), return_aux=True)


# -- kills during the checkpoint sequence ------------------------------------------------------
class Killed(BaseException):
    """Raised where a kill -9 would stop the process (not an Exception: nothing catches it)."""


def _kill_at(monkeypatch, k: int | None) -> list[str]:
    """Make the k-th file flush (every file of a run is flushed before its rename) raise Killed;
    returns the flushed paths, in order."""
    calls = []
    real = rundir.fsync_path

    def fsync(path):
        calls.append(str(path))
        if k is not None and len(calls) == k:
            raise Killed(path)
        real(path)

    monkeypatch.setattr(rundir, "fsync_path", fsync)
    monkeypatch.setattr(files, "fsync_path", fsync)
    return calls


def _weights(run: Path) -> dict:
    folder, _ = rundir.latest_checkpoint(run)
    return load_file(str(folder / "last.safetensors"))


def test_a_kill_at_any_step_of_a_checkpoint_then_resume_matches_an_unbroken_run(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(TrainConfig(model="afmp_tiny", epochs=3, out=str(straight), **TINY))
    expected = _weights(straight)
    # The kill points: every flush of epoch 2's writes (its checkpoint's files, manifest and
    # folder, the published copies, history.csv), up to the results at the end.
    flushes = _count_flushes(monkeypatch, tmp_path / "count", epochs=2)
    first = next(i for i, p in enumerate(flushes) if ".epoch-0001.tmp" in p)
    last = next(i for i, p in enumerate(flushes) if "results.json" in p)
    assert last - first >= 20, flushes[first:last]
    for k in range(first + 1, last + 1):  # 1-based: the k-th flush raises
        out = tmp_path / f"killed{k}"
        _kill_at(monkeypatch, k)
        with pytest.raises(Killed):
            train(TrainConfig(model="afmp_tiny", epochs=2, out=str(out), **TINY))
        monkeypatch.undo()
        train(TrainConfig(model="afmp_tiny", epochs=3, out=str(out), resume=True, **TINY))
        got = _weights(out)
        assert all(torch.equal(expected[n], got[n]) for n in expected), f"kill at flush {k}"
        # The published weights are those of the committed checkpoint, and load.
        assert afmp.load_checkpoint(out, "last").state_dict().keys() == expected.keys()
        assert not list(out.rglob(".*.tmp*"))


def _count_flushes(monkeypatch, out: Path, epochs: int) -> list[str]:
    calls = _kill_at(monkeypatch, None)
    train(TrainConfig(model="afmp_tiny", epochs=epochs, out=str(out), **TINY))
    monkeypatch.undo()
    return calls


def test_a_checkpoint_that_does_not_verify_is_skipped_for_the_one_before(tmp_path, capsys):
    out = tmp_path / "run"
    train(TrainConfig(model="afmp_tiny", epochs=2, out=str(out), **TINY))
    root = out / "checkpoints"
    # A crash between the rename of epoch 1's folder and the removal of epoch 0's leaves
    # both; if the newer one is then damaged, --resume goes back to the older one.
    newest = root / "epoch-0001"
    older = root / "epoch-0000"
    shutil.copytree(newest, older)
    manifest = json.loads((older / "manifest.json").read_text())
    state = torch.load(older / "state.pt", weights_only=True)
    state["epoch"] = 0
    state["history"] = {k: v[:1] for k, v in state["history"].items()}
    torch.save(state, older / "state.pt")
    manifest["files"]["state.pt"] = rundir.sha256_file(older / "state.pt")
    manifest["epoch"] = 0
    (older / "manifest.json").write_text(json.dumps(manifest))
    _flip_byte(newest / "last.safetensors")
    assert rundir.latest_checkpoint(out)[0] == older
    results = train(TrainConfig(model="afmp_tiny", epochs=2, out=str(out), resume=True, **TINY))
    assert "skipping a newer checkpoint" in capsys.readouterr().out
    assert len(results["training_history"]["val_acc"]) == 2
    # With no checkpoint that verifies, --resume stops and says why.
    for folder in root.glob("epoch-*"):
        _flip_byte(folder / "state.pt")
    with pytest.raises(UsageError, match="does not match its checksum"):
        train(TrainConfig(model="afmp_tiny", epochs=3, out=str(out), resume=True, **TINY))


def test_a_real_kill_leaves_a_stale_lock_and_temporaries_that_resume_clears(tmp_path):
    """kill -9 in the middle of writing epoch 2's manifest, in a process of its own."""
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {SRC!r})
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # this process's: the same sums
        from afmp.training import rundir
        from afmp.training.train import TrainConfig, train
        real = rundir.fsync_path
        def fsync(path):
            if str(path).endswith("manifest.json") and "epoch-0001" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            real(path)
        rundir.fsync_path = fsync
        train(TrainConfig(model="afmp_tiny", epochs=3, out={str(out)!r}, **{TINY!r}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert json.loads((out / ".lock").read_text())["pid"] != os.getpid()  # left behind
    assert list((out / "checkpoints").glob(".epoch-0001.tmp*"))  # a half-written folder
    assert rundir.latest_checkpoint(out)[0].name == "epoch-0000"
    train(TrainConfig(model="afmp_tiny", epochs=3, out=str(out), resume=True, **TINY))
    straight = tmp_path / "straight"
    train(TrainConfig(model="afmp_tiny", epochs=3, out=str(straight), **TINY))
    a, b = _weights(straight), _weights(out)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not (out / ".lock").exists() and not list(out.rglob(".*.tmp*"))


# -- a crafted state.pt ------------------------------------------------------------------------
class _RunsCode:
    """Pickled as a call of Path.touch: a loader that runs what a pickle asks creates the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _craft_state(folder: Path, marker: Path, kind: str) -> None:
    """Replace a checkpoint's state.pt, and its checksum in the manifest (as an attacker would)."""
    path = folder / "state.pt"
    if kind == "pickled object":
        state = torch.load(path, weights_only=True)
        state["optimizer"] = _RunsCode(marker)
        torch.save(state, path)
    elif kind == "no optimizer":
        state = torch.load(path, weights_only=True)
        del state["optimizer"]
        torch.save(state, path)
    else:
        path.write_bytes(b"not a state file")
    manifest = json.loads((folder / rundir.MANIFEST).read_text())
    manifest["files"]["state.pt"] = rundir.sha256_file(path)
    (folder / rundir.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "kind,words",
    [
        ("pickled object", "holds objects other than tensors, numbers and strings"),
        ("no optimizer", "expected the state of a training run, but it has no optimizer"),
        ("not a zip", "is not a readable state file"),
    ],
)
def test_a_crafted_state_file_is_refused_in_one_line_and_never_run(
    kind, words, tmp_path, finished_run, capsys
):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    folder, _ = rundir.latest_checkpoint(out)
    marker = tmp_path / "the-pickle-ran"
    _craft_state(folder, marker, kind)
    before = snapshot(out)
    assert cli.main(["train", *TINY_ARGS, "--epochs", "2", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"afmp train: error: {folder / 'state.pt'}") and err.count("\n") == 1, err
    assert words in err and "weights_only=False" not in err
    assert not marker.exists()
    assert snapshot(out) == before  # refused before anything was written


# -- one writer per run directory --------------------------------------------------------------
def test_a_second_writer_is_refused_and_a_dead_ones_lock_reclaimed(tmp_path, capsys, lock_holder):
    out = tmp_path / "run"
    holder = lock_holder(out)
    before = snapshot(out)
    assert cli.main(["train", *TINY_ARGS, "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"is being written by pid {holder.pid} on {socket.gethostname()}" in err
    assert snapshot(out) == before
    holder.kill()  # its lock file stays behind; the kernel releases the lock itself
    holder.join()
    assert cli.main(["train", *TINY_ARGS, "--epochs", "1", "--out", str(out)]) == 0
    assert f"reclaimed {out / '.lock'}: its process (pid {holder.pid}) is gone" in capsys.readouterr().out
    assert (out / "results.json").is_file() and not (out / ".lock").exists()


def test_two_training_processes_on_one_directory(tmp_path):
    """A real second process, started while the first is training."""
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--epochs", "500", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    first = subprocess.Popen(
        [sys.executable, "-m", "afmp_cli", "train", *args], env=env, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / ".lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / ".lock").exists(), "the first process never took the lock"
        second = subprocess.run(
            [sys.executable, "-m", "afmp_cli", "train", *args], env=env, capture_output=True, text=True
        )
        assert second.returncode == 2
        assert f"is being written by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


def test_a_study_directory_has_one_writer_too(tmp_path, capsys, lock_holder):
    out = tmp_path / "study"
    holder = lock_holder(out)
    argv = ["ablate", "topdown", *TINY_ARGS, "--epochs", "1", "--seeds", "1", "--out", str(out)]
    assert cli.main(argv) == 2
    assert f"is being written by pid {holder.pid}" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
