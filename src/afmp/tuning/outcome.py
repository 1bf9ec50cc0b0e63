"""What a search leaves beside its trials: ``trials.csv`` (one row per trial), ``best.yaml``
(the best trial's settings, a config that ``afmp train --config`` takes) and ``best.json``
(its validation accuracy, its run, and the budget the search has spent). All are written
whole (afmp.utils.files), from the study as it stands: any session may rewrite them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from afmp.training.config import RUNTIME_ONLY
from afmp.tuning.space import trial_config
from afmp.tuning.storage import shown
from afmp.utils.files import atomic_write, write_csv, write_json


def _seconds(trial) -> float | None:
    return trial.duration.total_seconds() if trial.duration is not None else None


def budget(trials) -> dict:
    """Trials by state, epochs trained (pruned trials' too) and time: summed over the trials
    (what a single worker would take) and from the first start to the last end (wall)."""
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    ended = [t for t in trials if t.datetime_complete is not None]
    wall = (
        (max(t.datetime_complete for t in ended) - min(t.datetime_start for t in ended)).total_seconds()
        if ended
        else 0.0
    )
    return {
        "trials": states,
        "epochs_trained": sum(len(t.intermediate_values) for t in trials),
        "trial_time_s": sum(_seconds(t) or 0.0 for t in ended),
        "wall_time_s": wall,
    }


def best_config(search, params: dict) -> dict:
    """The trial's settings as afmp train's --config takes them (where and how to run left out)."""
    cfg = trial_config(search.base, params)
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_ONLY}


def write_outcome(study, search) -> dict | None:
    """``search``'s (an afmp.tuning.search.Search, which calls this) trials.csv, and best.yaml and best.json if a trial completed; returns best.json's dict."""
    out = Path(search.out)
    trials = study.get_trials(deepcopy=False)
    names = list(search.space)
    rows = [
        {
            "trial": t.number,
            "state": t.state.name.lower(),
            "val_accuracy": t.value,
            "epochs_trained": len(t.intermediate_values),
            "time_s": _seconds(t),
            **{name: t.params.get(name) for name in names},
            "run": t.user_attrs.get("run"),
        }
        for t in trials
    ]
    write_csv(
        out / "trials.csv",
        rows,
        ["trial", "state", "val_accuracy", "epochs_trained", "time_s", *names, "run"],
    )
    spent = budget(trials)
    completed = [t for t in trials if t.state.name == "COMPLETE"]
    if not completed:
        print(f"no trial completed yet: no best.yaml ({spent['trials']})")
        return None
    best = study.best_trial
    config = best_config(search, best.params)
    record = {
        "study": search.study_name,
        "storage": shown(search.storage),
        "trial": best.number,
        "val_accuracy": best.value,
        "params": best.params,
        "run": best.user_attrs.get("run"),
        "config": config,
        "budget": spent,
    }
    counts = ", ".join(f"{n} {state}" for state, n in spent["trials"].items())
    header = (
        f"# afmp tune's best trial, {best.number} of study {search.study_name}: validation accuracy "
        f"{best.value:.2f}% ({best.user_attrs.get('run')}).\n"
        f"# Budget spent: trials {counts}; {spent['epochs_trained']} epochs, "
        f"{spent['trial_time_s']:.0f} s of trials ({spent['wall_time_s']:.0f} s wall). See best.json.\n"
        "# Train it: afmp train --config best.yaml --out DIR\n"
    )
    text = header + yaml.safe_dump(config, sort_keys=False)
    atomic_write(out / "best.yaml", lambda tmp: tmp.write_text(text))
    write_json(out / "best.json", record)
    return record
