"""A search space: what `afmp tune` draws for each trial, read from a YAML file and checked.

The shipped file (``afmp/configs/tune/spaces.yaml``) holds one space per model family, the
model's class; its comment gives the syntax. A space maps a parameter (a TrainConfig field,
``model_opts.FIELD`` or ``data_opts.OPTION``) to a distribution, a ``Param``. Every value at
a range's ends goes through afmp train's own checks before a trial runs, so a bad file is a
one-line error before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from afmp.data import build_dataset, dataset_options
from afmp.registry import config_fields, model_entry, resolve_config
from afmp.training.config import CHECKS, TrainConfig, check_config
from afmp.utils.errors import UsageError

SPACES = Path(__file__).parents[1] / "configs" / "tune" / "spaces.yaml"
KINDS = ("float", "int", "choice")
# TrainConfig fields a search may draw: the recipe. The others say what is trained, where and
# how it is run (model, dataset, out, device, seed, ...), which a search holds fixed.
SEARCHABLE = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "weight_decay_on",
    "scheduler",
    "warmup_epochs",
    "clip_grad",
    "label_smoothing",
    "mixup_alpha",
    "ema_decay",
    "select",
)
NESTED = ("model_opts", "data_opts")


@dataclass(frozen=True)
class Param:
    """One parameter's distribution: a float or int range (``log``: uniform in its logarithm;
    ``step``: on a grid from ``low``), or a ``choice`` among values."""

    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial, name: str):
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def edges(self) -> list:
        """The values a check must pass: a range's ends, or every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def capped(self, cap: int) -> Param:
        """An int range with no value above ``cap`` (on its grid; just ``cap`` if all were above)."""
        if self.kind == "choice":
            kept = tuple(c for c in self.choices if c <= cap)
            return dataclasses.replace(self, choices=kept or (cap,))
        if self.low >= cap:
            return dataclasses.replace(self, low=cap, high=cap)
        step = self.step or 1
        return dataclasses.replace(self, high=min(self.high, self.low + (cap - self.low) // step * step))

    def record(self) -> dict:
        """The distribution as plain data (what the study stores, to tell a changed space)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, False, ())}


def _number(value, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return isinstance(value, int) if integer else True


def parse_param(entry) -> Param:
    """A space file's entry ({float: [low, high], log: true}, {int: ...}, {choice: [...]}) as a Param."""
    syntax = "{float: [LOW, HIGH]}, {int: [LOW, HIGH]} (with log: true or step: S) or {choice: [A, B]}"
    if not isinstance(entry, dict) or len(set(entry) & set(KINDS)) != 1:
        raise ValueError(f"expected one of {syntax}, got {entry!r}")
    (kind,) = set(entry) & set(KINDS)
    extra = sorted(set(entry) - {kind, "log", "step"})
    if extra or (kind == "choice" and len(entry) > 1):
        raise ValueError(
            f"unknown key(s) {', '.join(map(str, extra)) or 'log/step'} in {entry!r}; expected {syntax}"
        )
    if kind == "choice":
        choices = entry["choice"]
        if not isinstance(choices, list) or not choices or any(isinstance(c, (dict, list)) for c in choices):
            raise ValueError(f"choice expects a non-empty list of values, got {choices!r}")
        return Param("choice", choices=tuple(choices))
    bounds, log, step = entry[kind], entry.get("log", False), entry.get("step")
    integer = kind == "int"
    if not isinstance(bounds, list) or len(bounds) != 2 or not all(_number(b, integer) for b in bounds):
        raise ValueError(
            f"{kind} expects [LOW, HIGH], two {'integers' if integer else 'numbers'}, got {bounds!r}"
        )
    low, high = bounds
    if low > high:
        raise ValueError(f"{kind} range [{low}, {high}]: LOW must not exceed HIGH")
    if not isinstance(log, bool) or (log and low <= 0):
        raise ValueError(
            f"log must be true or false, and a log range must start above 0; got log {log!r} from {low}"
        )
    if step is not None:
        if not _number(step, integer) or step <= 0 or log:
            raise ValueError(
                f"step must be a positive {'integer' if integer else 'number'}, without log; got {step!r}"
            )
        if not math.isclose((high - low) / step, round((high - low) / step)):
            raise ValueError(f"step {step} does not divide the range [{low}, {high}]")
    return Param(kind, low, high, log, step)


def read_space(path: Path, family: str) -> dict[str, Param]:
    """The space of ``family`` in the file at ``path``: parameter name -> Param (syntax checked)."""
    try:
        spaces = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UsageError(f"--space {path}: cannot read it ({err.strerror or err})") from err
    except yaml.YAMLError as err:
        raise UsageError(f"--space {path} is not valid YAML ({' '.join(str(err).split())})") from err
    if not isinstance(spaces, dict):
        raise UsageError(f"--space {path}: expected a mapping of model families to search spaces")
    if family not in spaces:
        raise UsageError(
            f"--space {path} has no search space for the model family {family}; "
            f"it has {', '.join(map(str, spaces)) or 'none'}"
        )
    space = spaces[family]
    if not isinstance(space, dict) or not space:
        raise UsageError(f"--space {path}: {family} must map parameter names to distributions")
    params = {}
    for name, entry in space.items():
        try:
            params[str(name)] = parse_param(entry)
        except ValueError as err:
            raise UsageError(f"--space {path}: {family}.{name}: {err}") from None
    return params


def trial_config(base: TrainConfig, values: dict) -> TrainConfig:
    """``base`` with a trial's values (``model_opts.X`` and ``data_opts.X`` into their mappings)."""
    fields: dict = {"model_opts": dict(base.model_opts), "data_opts": dict(base.data_opts)}
    for name, value in values.items():
        group, dot, key = name.partition(".")
        if dot:
            fields[group][key] = value
        else:
            fields[name] = value
    return dataclasses.replace(base, **fields)


def family_of(model: str) -> str:
    """A model's family, the name its search space is filed under: its class (``afmp models``)."""
    return model_entry(model)[0].__name__


def load_space(
    path: Path, base: TrainConfig, max_epochs: int | None = None
) -> tuple[dict[str, Param], list[str]]:
    """The space a search of ``base`` draws from, read from ``path`` and checked, and what was
    changed to fit: ``data_opts`` parameters the data set lacks are left out, ``epochs`` is
    capped at ``max_epochs``. Returns (space, a line for each change)."""
    space, notes = read_space(path, family_of(base.model)), []
    own, forwards = dataset_options(base.dataset)
    for name in list(space):
        group, _, key = name.partition(".")
        if group == "data_opts" and not forwards and key not in own:
            del space[name]
            notes.append(f"{name} left out: the data set {base.dataset} has no option {key}")
    if max_epochs is not None and "epochs" in space:
        space["epochs"] = space["epochs"].capped(max_epochs)
        notes.append(f"epochs drawn from {space['epochs'].edges()} (--max-epochs {max_epochs})")
    check_space(space, base, path)
    return space, notes


def check_space(space: dict[str, Param], base: TrainConfig, path: Path) -> None:
    """Every parameter a setting a trial may draw, and every value at its ends one that afmp
    train accepts (the data set's options: built at the lowest ends, then at the highest)."""
    family = family_of(base.model)
    model_fields = config_fields(model_entry(base.model)[0])
    for name, param in space.items():
        group, dot, key = name.partition(".")
        where = f"--space {path}: {family}.{name}"
        if dot and group not in NESTED:
            raise UsageError(f"{where}: expected a setting, model_opts.FIELD or data_opts.OPTION")
        if not dot and name not in SEARCHABLE:
            why = "not a setting of afmp train" if name not in CHECKS else "held fixed by a search"
            raise UsageError(f"{where}: {why}; a space may draw {', '.join(SEARCHABLE)}")
        if group == "model_opts" and key not in model_fields:
            raise UsageError(
                f"{where}: {base.model} has no option {key}; its options: {', '.join(model_fields)}"
            )
        for value in param.edges():
            cfg = trial_config(base, {name: value})
            try:
                if group == "model_opts":
                    resolve_config(cfg.model, **cfg.model_opts)
                elif group != "data_opts":
                    check_config(cfg)
            except (ValueError, TypeError) as err:
                raise UsageError(f"{where}: the value {value!r} is refused: {err}") from None
    data = {name: p for name, p in space.items() if name.startswith("data_opts.")}
    for end in (0, -1):  # building the data is the one check of a loader's options
        values = {name: p.edges()[end] for name, p in data.items()}
        if values:
            cfg = trial_config(base, values)
            try:
                build_dataset(
                    cfg.dataset, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction, **cfg.data_opts
                )
            except UsageError:  # the data's files are missing: the loader's message says where
                raise
            except (ValueError, TypeError) as err:
                raise UsageError(f"--space {path}: {family}: the data set refuses {values}: {err}") from None
