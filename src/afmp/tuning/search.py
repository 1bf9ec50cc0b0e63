"""The search: an Optuna study whose trials are afmp train runs, N workers at once.

A trial draws its settings from the space (afmp.tuning.space), trains them as an ordinary
run in ``OUT/trials/trial-NNNN/`` on the training split, and reports the validation
accuracy after each epoch; the pruner stops a trial below the median of the earlier ones
at the same point of their schedules (``schedule_step``). The trial's value is the
validation accuracy of the weights its run would test. No test example is read (``train(..., test=False)``).

Every trial trains with the base config's seed: trials differ by their settings alone,
not by their initial weights and batches. The sampler is TPE, seeded from ``--seed``, the
trials the study already holds and the worker's index: workers and restarts draw different
settings, and the same command on the same study draws the same ones.

A study is resumable: run the command again and it counts the trials already finished
(completed or pruned) against ``--trials``. A trial a kill left running in the local file
is marked failed (the output folder's lock says no one else runs it); one in a storage
elsewhere (a server, another file) is failed by Optuna's heartbeat (afmp.tuning.storage).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afmp.training.config import RUNTIME_ONLY, TrainConfig
from afmp.training.rundir import RunLock
from afmp.training.train import train
from afmp.tuning.outcome import write_outcome
from afmp.tuning.space import Param, trial_config
from afmp.tuning.storage import open_storage, shown, storage_url
from afmp.utils.errors import UsageError
from afmp.utils.parallel import run_in_processes, threads_per_job

# A trial reports its validation accuracy after each epoch at the step `schedule_step`: the
# share of its own schedule done, in thousandths. The pruner compares a trial only with
# trials that reported at the same step, so trials of different lengths meet at the same
# point of their schedules (a quarter, a half, ...), where their learning rates are alike.
# Compared epoch with epoch, a long schedule's early epochs (at a high learning rate) met a
# short one's last (annealed) ones, and the pruner favoured short schedules. The median means
# little over fewer finished trials, and the first quarter (warm-up) says little about the
# end: no trial is pruned before PRUNE_AFTER_TRIALS have finished, nor before step
# PRUNE_FROM_STEP.
SCHEDULE_STEPS = 1000
PRUNE_AFTER_TRIALS, PRUNE_FROM_STEP = 3, 250


def schedule_step(epoch: int, epochs: int) -> int:
    """The pruner's step after ``epoch`` of ``epochs``: thousandths of the schedule done."""
    return epoch * SCHEDULE_STEPS // epochs


def pruner():
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS, n_warmup_steps=PRUNE_FROM_STEP)


@dataclass(frozen=True)
class Search:
    """What a search runs: every trial is ``base`` with the space's values."""

    base: TrainConfig
    space: dict[str, Param]
    out: str
    storage: str  # a checked URL (afmp.tuning.storage.storage_url)
    study_name: str
    trials: int  # the budget: trials finished (completed or pruned), over every session
    jobs: int = 1
    prune: bool = True

    def settings(self) -> dict:
        """What the study records: a study continued with other settings is refused."""
        base = {k: v for k, v in dataclasses.asdict(self.base).items() if k not in RUNTIME_ONLY}
        space = {name: p.record() for name, p in self.space.items()}
        # prune_steps: what a reported step means (a study whose steps were epochs is refused)
        prune_steps = f"schedule/{SCHEDULE_STEPS}"
        return json.loads(
            json.dumps({"base": base, "space": space, "prune": self.prune, "prune_steps": prune_steps})
        )

    def private(self) -> bool:
        """Whether the study is the file in the output folder, whose lock keeps out every
        other command: then a trial left running is one a kill interrupted."""
        return self.storage == storage_url(Path(self.out), None)

    def trial_dir(self, number: int) -> Path:
        return Path(self.out) / "trials" / f"trial-{number:04d}"


def worker_seed(seed: int, started: int, worker: int) -> int:
    """A worker's sampler seed, from --seed, the trials the study held when the search started
    and the worker's index (a worker reseeded alike would draw what another drew)."""
    return int(np.random.SeedSequence([seed, started, worker]).generate_state(1)[0])


def shares(remaining: int, jobs: int) -> list[int]:
    """Trials per worker, ``remaining`` shared out as evenly as can be; no worker without one."""
    return [n for n in (remaining // jobs + (i < remaining % jobs) for i in range(jobs)) if n]


def finished_states():
    import optuna

    return (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class PruneOnEpoch:
    """The run's epoch hook: report the validation accuracy to the trial, stop it if pruned."""

    def __init__(self, trial, prune: bool):
        self.trial, self.prune = trial, prune

    def __call__(self, run, epoch: int) -> None:
        import optuna

        value, epochs = run.progress.history["val_acc"][-1], run.cfg.epochs
        self.trial.report(value, schedule_step(epoch, epochs))
        if self.prune and self.trial.should_prune():
            raise optuna.TrialPruned(
                f"val {value:.2f}% at epoch {epoch} of {epochs}, below the median of the earlier trials "
                "at that point of their schedules"
            )


@dataclass(frozen=True)
class Objective:
    search: Search
    threads: int

    def __call__(self, trial) -> float:
        values = {name: param.suggest(trial, name) for name, param in self.search.space.items()}
        out = self.search.trial_dir(trial.number)
        cfg = dataclasses.replace(
            trial_config(self.search.base, values), out=str(out), threads=self.threads, resume=False
        )
        trial.set_user_attr("run", str(out))
        print(f"trial {trial.number} -> {out}: {values}", flush=True)
        results = train(cfg, on_epoch=PruneOnEpoch(trial, self.search.prune), test=False)
        return results["val_accuracy"]


def open_study(search: Search, storage, seed: int | None = None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are reported by report_trial
    # Optuna's default of 10 random trials before TPE would leave a 12-trial budget 2 guided ones.
    startup = max(2, min(10, search.trials // 3))
    return optuna.create_study(
        storage=storage,
        study_name=search.study_name,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup),
        pruner=pruner(),
    )


def report_trial(study, trial) -> None:
    value = f"val {trial.value:.2f}%" if trial.value is not None else "no value"
    epochs = len(trial.intermediate_values)
    print(f"trial {trial.number}: {trial.state.name.lower()}, {value} after {epochs} epoch(s)", flush=True)


def work(search: Search, share: int, seed: int, threads: int) -> None:
    """One worker: ``share`` trials of the study (a process of its own with --jobs > 1)."""
    from optuna.study import MaxTrialsCallback

    study = open_study(search, open_storage(search.storage, shared=not search.private()), seed)
    # Workers on other machines share a server's study: stop once the budget is spent there.
    enough = MaxTrialsCallback(search.trials, states=finished_states())
    study.optimize(Objective(search, threads), n_trials=share, callbacks=[report_trial, enough])


def fail_interrupted(study, storage) -> None:
    """Mark failed the trials a kill left running (call it holding the output folder's lock)."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
        print(
            f"trial {trial.number} was interrupted: marked failed, not counted ({trial.user_attrs.get('run')})"
        )


def _flat(settings: dict) -> dict:
    """{"base": {"lr": 0.1}, "prune": True} -> {"base.lr": 0.1, "prune": True}."""
    return {
        f"{part}.{key}" if isinstance(value, dict) else part: inner
        for part, value in settings.items()
        for key, inner in (value.items() if isinstance(value, dict) else [(None, value)])
    }


def check_same_search(study, search: Search) -> None:
    """Record the search's settings in a new study; refuse to continue one started with others."""
    recorded, now = study.user_attrs.get("search"), search.settings()
    if recorded is None:
        study.set_user_attr("search", now)
        return
    before, after = _flat(recorded), _flat(now)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} there, {after.get(k)!r} now" for k in changed)
        raise UsageError(
            f"study {search.study_name} in {shown(search.storage)} was started with other settings "
            f"({details}); use a new --out or --study-name"
        )


def run_search(search: Search) -> dict | None:
    """Run the trials still missing from the budget, then write trials.csv, best.yaml and
    best.json (afmp.tuning.outcome); returns best.json's dict (None: no trial completed)."""
    out, private = Path(search.out), search.private()
    # A server or another file is opened before anything is written here; the default file
    # lives in the output folder, created holding its lock.
    storage = None if private else open_storage(search.storage)
    with RunLock(out):
        storage = storage or open_storage(search.storage, shared=False)
        study = open_study(search, storage)
        check_same_search(study, search)
        if private:
            fail_interrupted(study, storage)
        started = len(study.trials)
        done = len(study.get_trials(deepcopy=False, states=finished_states()))
        todo = shares(max(0, search.trials - done), search.jobs)
        threads = search.base.threads or (threads_per_job(search.jobs) if search.jobs > 1 else 0)
        print(
            f"study {search.study_name} in {shown(search.storage)}: {done} of {search.trials} trials finished, "
            f"{sum(todo)} to run, {len(todo) or 1} at a time"
            + (f" ({threads} thread(s) each)" if threads else "")
        )
        calls = [
            (search, share, worker_seed(search.base.seed, started, i), threads)
            for i, share in enumerate(todo)
        ]
        if len(calls) == 1:
            work(*calls[0])
        elif calls:
            run_in_processes(work, calls, search.jobs)
        return write_outcome(open_study(search, storage), search)
