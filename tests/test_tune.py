"""`afmp tune`: the search space and its checks, the storage URL, a search that reads no test
example and whose best config trains the best trial again, resuming after a kill, and
--jobs (trials at once, each computing what a serial run computes)."""

import csv
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from torch.utils.data import Dataset

import afmp_cli as cli
from afmp.data import base as data_base
from afmp.data.images import digits
from afmp.training.config import TrainConfig
from afmp.tuning import search as tuning
from afmp.tuning import space as spaces
from afmp.tuning import storage
from afmp.utils.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")
optuna = pytest.importorskip("optuna")

TINY = ["-o", "d_model=16", "-o", "num_layers=2", "-o", "k_dim=8", "-o", "score_hidden=8"]
SRC = Path(__file__).resolve().parents[1] / "src"


def _argv(out, *extra, dataset="digits"):
    return ["tune", "--dataset", dataset, "--batch-size", "128", "--out", str(out), *TINY, *extra]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _history(run):
    """history.csv's columns that the computation fixes (time, images/s and MFU are the machine's)."""
    keep = ("epoch", "train_loss", "train_acc", "val_acc", "sparsity_loss")
    return [{k: r[k] for k in keep} for r in _rows(Path(run) / "history.csv")]


# -- the space ------------------------------------------------------------------------------
def test_a_space_entry_is_read_as_optunas_distribution_and_refused_with_the_reason():
    assert spaces.parse_param({"float": [1e-4, 1e-2], "log": True}) == spaces.Param(
        "float", 1e-4, 1e-2, log=True
    )
    assert spaces.parse_param({"int": [8, 20], "step": 4}) == spaces.Param("int", 8, 20, step=4)
    assert spaces.parse_param({"choice": [0.0, 0.2]}) == spaces.Param("choice", choices=(0.0, 0.2))
    for entry, reason in [
        ({"float": [2, 1]}, "LOW must not exceed HIGH"),
        ({"float": [0, 1], "log": True}, "a log range must start above 0"),
        ({"int": [8, 20], "step": 5}, "step 5 does not divide the range [8, 20]"),
        ({"int": [0.5, 2]}, "int expects [LOW, HIGH], two integers"),
        ({"float": [0, 1], "lg": True}, "unknown key(s) lg"),
        ({"choice": []}, "choice expects a non-empty list"),
        ({"float": [0, 1], "int": [0, 1]}, "expected one of"),
        (0.1, "expected one of"),
    ]:
        with pytest.raises(
            ValueError,
            match=reason.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)"),
        ):
            spaces.parse_param(entry)
    # --max-epochs caps an epochs range on its grid, and a range wholly above the cap to the cap.
    epochs = spaces.Param("int", 8, 20, step=4)
    assert epochs.capped(18).edges() == [8, 16] and epochs.capped(20).edges() == [8, 20]
    assert epochs.capped(3).edges() == [3, 3]
    assert spaces.Param("choice", choices=(5, 10, 20)).capped(12).edges() == [5, 10]


@pytest.mark.parametrize(
    ("model", "searched"),
    [("afmp_tiny", None), ("vit_baseline_tiny", "model_opts.drop_path_rate"), ("convnet_resnet10t", None)],
)
def test_every_shipped_space_passes_the_checks_and_the_vits_search_drop_path(model, searched, tmp_path):
    base = TrainConfig(model=model, dataset="digits", out=str(tmp_path / "x"))
    space, notes = spaces.load_space(spaces.SPACES, base, max_epochs=10)
    expected = {"lr", "weight_decay", "warmup_epochs", "epochs", "label_smoothing", "mixup_alpha"}
    assert expected | {"data_opts.shift", "data_opts.degrees", "data_opts.scale"} <= set(space)
    assert ("model_opts.drop_path_rate" in space) == (searched is not None)
    assert space["epochs"].edges() == [8, 8] and notes == ["epochs drawn from [8, 8] (--max-epochs 10)"]
    # A data set without augmentation options leaves them out, and says so.
    synthetic, notes = spaces.load_space(
        spaces.SPACES, TrainConfig(model=model, dataset="synthetic", out=str(tmp_path))
    )
    assert set(synthetic) == set(space) - {"data_opts.shift", "data_opts.degrees", "data_opts.scale"}
    assert "data_opts.shift left out: the data set synthetic has no option shift" in notes
    assert not any(tmp_path.iterdir())  # checking writes nothing


BAD_SPACES = {
    "not YAML": ("AFMP: {lr: [", "is not valid YAML"),
    "no space for the family": (
        "ConvNet: {lr: {float: [0.1, 0.2]}}",
        "has no search space for the model family AFMP; it has ConvNet",
    ),
    "empty range": (
        "AFMP: {lr: {float: [0.1, 0.01]}}",
        "AFMP.lr: float range [0.1, 0.01]: LOW must not exceed HIGH",
    ),
    "out of afmp train's range": (
        "AFMP: {label_smoothing: {float: [0.0, 1.0]}}",
        "AFMP.label_smoothing: the value 1.0 is refused: label_smoothing (--label-smoothing) must be a number in [0, 1)",
    ),
    "not a setting": (
        "AFMP: {learning_rate: {float: [0.1, 0.2]}}",
        "AFMP.learning_rate: not a setting of afmp train",
    ),
    "held fixed": ("AFMP: {seed: {int: [0, 3]}}", "AFMP.seed: held fixed by a search"),
    "another family's option": (
        "AFMP: {model_opts.drop_path_rate: {float: [0, 0.2]}}",
        "afmp_tiny has no option drop_path_rate",
    ),
    "refused by the model": (
        "AFMP: {model_opts.sparsity: {float: [0.0, 1.0]}}",
        "the value 1.0 is refused: sparsity is the fraction",
    ),
    "refused by the data set": (
        "AFMP: {data_opts.shift: {int: [-1, 2]}}",
        "the data set refuses {'data_opts.shift': -1}",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_a_bad_search_space_file_is_one_line_and_nothing_is_written(case, tmp_path, capsys):
    text, message = BAD_SPACES[case]
    path = tmp_path / "space.yaml"
    path.write_text(text)
    out = tmp_path / "search"
    assert cli.main(_argv(out, "--space", str(path))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"afmp tune: error: --space {path}") and err.count("\n") == 1
    assert message in err
    assert not out.exists()


def test_a_flag_for_a_drawn_setting_is_refused_not_overridden(tmp_path, capsys):
    for flags, drawn in ((["--lr", "0.1"], "lr"), (["--data-opt", "shift=1"], "data_opts.shift")):
        assert cli.main(_argv(tmp_path / "x", *flags)) == 2
        assert f"draws {drawn}; leave it off the command line" in capsys.readouterr().err
    assert cli.main(_argv(tmp_path / "x", "--trials", "0")) == 2
    assert "--trials and --max-epochs must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -- the storage ----------------------------------------------------------------------------
def test_the_storage_is_a_file_in_the_output_folder_or_a_database_servers_url(tmp_path):
    out = tmp_path / "search"
    assert storage.storage_url(out, None) == f"sqlite:///{out.absolute() / 'study.db'}"
    for url in (
        "postgresql://me:secret@db.example:5432/afmp",
        "mysql+pymysql://me@db/afmp",
        f"sqlite:///{tmp_path}/s.db",
    ):
        assert storage.storage_url(out, url) == url  # Optuna's own URL, passed on unchanged
    for url, reason in [
        ("study.db", "is not a database URL"),
        ("redis://localhost:6379", "redis is not a storage Optuna keeps studies in"),
        ("sqlite://", "an in-memory SQLite database is lost"),
        ("postgresql:///afmp", "no server named"),
    ]:
        with pytest.raises(UsageError, match=reason):
            storage.storage_url(out, url)
    assert storage.shown("postgresql://me:secret@db/afmp") == "postgresql://me:***@db/afmp"
    # No server here: a missing driver or a refused connection is one line, the password hidden.
    with pytest.raises(UsageError) as caught:
        storage.open_storage("postgresql://me:secret@127.0.0.1:9/afmp")
    assert str(caught.value).startswith("--storage postgresql://me:***@127.0.0.1:9/afmp: ")
    assert "secret" not in str(caught.value)
    assert ("not installed here; pip install psycopg2-binary" in str(caught.value)) or (
        "cannot open the database" in str(caught.value)
    )
    with pytest.raises(UsageError, match="cannot open the database"):
        storage.open_storage(f"sqlite:///{tmp_path}/no/such/folder/s.db")
    # Beyond the output folder's lock, a trial a kill left running is found by its missing heartbeat.
    elsewhere = f"sqlite:///{tmp_path}/shared.db"
    assert storage.open_storage(elsewhere).heartbeat_interval > 0
    assert storage.open_storage(elsewhere, shared=False).heartbeat_interval is None
    base = TrainConfig(out=str(out))
    assert tuning.Search(base, {}, str(out), storage.storage_url(out, None), "s", 1).private()
    assert not tuning.Search(base, {}, str(out), elsewhere, "s", 1).private()


# -- the search's parts ---------------------------------------------------------------------
def test_workers_and_restarts_draw_with_seeds_of_their_own_and_share_the_trials():
    seeds = {tuning.worker_seed(0, started, worker) for started in (0, 3) for worker in (0, 1)}
    assert len(seeds) == 4  # no two workers, and no restart, draw the same settings
    assert tuning.worker_seed(0, 3, 1) == tuning.worker_seed(0, 3, 1) != tuning.worker_seed(1, 3, 1)
    assert tuning.shares(5, 2) == [3, 2] and tuning.shares(1, 3) == [1] and tuning.shares(0, 2) == []


def test_the_epoch_hook_reports_validation_accuracy_and_stops_a_pruned_trial():
    class Run:
        class cfg:
            epochs = 8

        class progress:
            history = {"val_acc": [40.0, 55.0]}

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=60.0))
    trial = study.ask()
    tuning.PruneOnEpoch(trial, prune=False)(Run, 2)  # reported, not stopped
    with pytest.raises(optuna.TrialPruned, match="val 55.00% at epoch 3 of 8, below the median"):
        tuning.PruneOnEpoch(trial, prune=True)(Run, 3)
    assert study.trials[0].intermediate_values == {250: 55.0, 375: 55.0}  # 2/8 and 3/8 of the schedule


def test_trials_of_different_lengths_are_compared_at_the_same_point_of_their_schedules():
    """Three finished 8-epoch trials: 80% up to a quarter of their schedule (epoch 2), 90%
    from then on. A 20-epoch trial at 70% is not pruned in its first quarter, and is pruned at
    its epoch 5, a quarter of its schedule, below their 80% there. One at 85% until epoch 5,
    then 70%, meets no 8-epoch trial at 3/10, 7/20, 2/5 or 9/20 of its schedule and goes on;
    at its epoch 10, halfway, its best (85%) is below their 90% and it is pruned. A 16-epoch
    trial meets them at an eighth, but is first pruned a quarter of the way, at epoch 4."""
    study = optuna.create_study(direction="maximize", pruner=tuning.pruner())
    for _ in range(3):
        steps = {tuning.schedule_step(e, 8): 80.0 if e <= 2 else 90.0 for e in range(1, 9)}
        study.add_trial(optuna.trial.create_trial(value=90.0, intermediate_values=steps))
    assert sorted(study.trials[0].intermediate_values) == [125, 250, 375, 500, 625, 750, 875, 1000]

    def run_of(history, epochs=20):
        cfg = type("cfg", (), {"epochs": epochs})
        return type(
            "Run", (), {"cfg": cfg, "progress": type("progress", (), {"history": {"val_acc": history}})}
        )

    def pruned_at(accuracies):
        trial, history = study.ask(), []
        for epoch, acc in enumerate(accuracies, start=1):
            history.append(acc)
            try:
                tuning.PruneOnEpoch(trial, prune=True)(run_of(history, len(accuracies)), epoch)
            except optuna.TrialPruned:
                return epoch
        return None

    assert pruned_at([70.0] * 20) == 5
    assert pruned_at([70.0] * 16) == 4  # 2/16 meets their epoch 1 but is in the first quarter
    assert pruned_at([85.0] * 5 + [70.0] * 15) == 10
    assert tuning.schedule_step(5, 20) == tuning.schedule_step(2, 8) == 250


# -- searches -------------------------------------------------------------------------------
class GuardedTest(Dataset):
    """A test split that fails the run if an example of it is read."""

    reads = 0

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        GuardedTest.reads += 1
        raise AssertionError("a test example was read")


@pytest.fixture
def guarded_digits():
    """`digits-guarded`: digits, but reading a test example raises."""

    def load(**options):
        bundle = digits(**options)
        bundle.test = GuardedTest(len(bundle.test))
        return bundle

    load.__signature__ = inspect.signature(digits)  # its options, for the checks of a space
    data_base.DATASETS["digits-guarded"] = load
    GuardedTest.reads = 0
    yield "digits-guarded"
    del data_base.DATASETS["digits-guarded"]


def test_a_search_reads_no_test_example_and_its_best_config_trains_the_best_trial(
    guarded_digits, tmp_path, capsys
):
    out = tmp_path / "search"
    assert cli.main(_argv(out, "--trials", "2", "--max-epochs", "2", dataset=guarded_digits)) == 0
    assert GuardedTest.reads == 0
    rows = _rows(out / "trials.csv")
    assert [(r["trial"], r["state"], r["epochs_trained"]) for r in rows] == [
        (str(n), "complete", "2") for n in range(2)
    ]
    results = {int(r["trial"]): json.loads((Path(r["run"]) / "results.json").read_text()) for r in rows}
    assert all(r["test_accuracy"] is None for r in results.values())
    # Trials differ by the settings drawn alone: each trains with the command's seed.
    assert [r["config"]["seed"] for r in results.values()] == [0, 0]
    for row in rows:  # a trial's value: the validation accuracy of the weights its run would test
        assert float(row["val_accuracy"]) == results[int(row["trial"])]["val_accuracy"]
    best = json.loads((out / "best.json").read_text())
    top = max(results, key=lambda n: (results[n]["val_accuracy"], -n))
    assert best["trial"] == top and best["val_accuracy"] == results[top]["val_accuracy"]
    assert best["budget"]["trials"] == {"complete": 2} and best["budget"]["epochs_trained"] == 4
    text = (out / "best.yaml").read_text()
    assert f"validation accuracy {results[top]['val_accuracy']:.2f}%" in text.splitlines()[0]
    # best.yaml is a config afmp train takes: on the same data it trains the best trial again...
    capsys.readouterr()
    assert (
        cli.main(
            [
                "train",
                "--config",
                str(out / "best.yaml"),
                "--dataset",
                "digits",
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    assert _history(tmp_path / "again") == _history(best["run"])
    # ...and afmp train does read the test split: the guard above would have caught a search that did.
    with pytest.raises(AssertionError, match="a test example was read"):
        cli.main(["train", "--config", str(out / "best.yaml"), "--out", str(tmp_path / "tested")])


KILLER = """
import os, signal, sys
from afmp.tuning import search

report = search.PruneOnEpoch.__call__

def killed_in_trial_1(self, run, epoch):
    report(self, run, epoch)
    if self.trial.number == 1 and epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as a kill -9 or a power cut would

search.PruneOnEpoch.__call__ = killed_in_trial_1
import afmp_cli
sys.exit(afmp_cli.main(sys.argv[1:]))
"""


def test_a_killed_search_continues_where_it_stopped(tmp_path, capsys):
    out = tmp_path / "search"
    argv = _argv(out, "--trials", "2", "--max-epochs", "2")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLER), *argv], env=env, capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    study = optuna.load_study(study_name="afmp_tiny-digits", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    first = out / "trials" / "trial-0000" / "results.json"
    kept = first.stat().st_mtime_ns

    # The same command again: trial 0 is kept, the killed trial 1 is failed, trial 2 takes its place.
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "trial 1 was interrupted: marked failed, not counted" in printed
    assert "1 of 2 trials finished, 1 to run" in printed
    assert first.stat().st_mtime_ns == kept
    rows = _rows(out / "trials.csv")
    assert [(r["trial"], r["state"]) for r in rows] == [("0", "complete"), ("1", "fail"), ("2", "complete")]
    spent = json.loads((out / "best.json").read_text())["budget"]
    assert spent["trials"] == {"complete": 2, "fail": 1}
    assert spent["epochs_trained"] == 2 + 1 + 2  # the killed trial's one epoch is spent too

    # Done: running it again trains nothing; with other settings it is refused, not mixed in.
    assert cli.main(argv) == 0 and "2 of 2 trials finished, 0 to run" in capsys.readouterr().out
    assert cli.main(_argv(out, "--trials", "2", "--max-epochs", "2", "--seed", "1")) == 2
    assert "was started with other settings (base.seed: 0 there, 1 now)" in capsys.readouterr().err


def test_jobs_run_trials_at_once_each_computing_what_a_serial_run_computes(tmp_path, capsys):
    out = tmp_path / "search"
    assert cli.main(_argv(out, "--trials", "2", "--max-epochs", "2", "--jobs", "2")) == 0
    study = optuna.load_study(study_name="afmp_tiny-digits", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]  # the budget, no more
    first, second = study.trials
    assert first.datetime_start < second.datetime_complete and second.datetime_start < first.datetime_complete
    assert first.params != second.params  # the two workers drew for themselves
    for trial in study.trials:
        run = Path(trial.user_attrs["run"])
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["threads"] == config["machine"]["threads"] == max(1, os.cpu_count() // 2)
        # The trial's run again, alone in this process: the same numbers, epoch by epoch.
        serial = tmp_path / f"serial{trial.number}"
        assert cli.main(["train", "--config", str(run / "config.yaml"), "--out", str(serial)]) == 0
        assert _history(serial) == _history(run)
        assert trial.value == json.loads((serial / "results.json").read_text())["val_accuracy"]
