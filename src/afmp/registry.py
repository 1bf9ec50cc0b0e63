"""One registry and one factory for every model family.

A model family is an ``nn.Module`` subclass with a nested ``Config`` dataclass and a
constructor ``Model(cfg)``. A preset is a name, the data set it is made for (its
normalisation goes into the model's timm ``pretrained_cfg``) and the config fields it sets::

    register_model("afmp_tiny", AFMP, data="cifar100", num_layers=4, d_model=128, patch_size=8)

``create_model(name, **overrides)`` builds ``Config(**{**preset, **overrides})``,
so every config field is an override and an unknown one is an error that lists
the valid ones. Each preset is also registered in timm's registry, so that
``timm.create_model("afmp_tiny")`` works once ``afmp`` is imported.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import sys
import types
import typing

from torch import nn

from afmp.data.stats import STATS

_MODELS: dict[str, tuple[type[nn.Module], dict]] = {}
_DATA: dict[str, str | None] = {}  # preset -> the data set it is made for (afmp.data.stats)

# Keyword arguments timm.create_model adds on its own; they mean nothing to our models.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def register_model(name: str, model_cls: type[nn.Module], *, data: str | None = None, **preset) -> None:
    """Register preset ``name`` of ``model_cls`` (its ``Config`` fields in ``preset``; ``data``:
    the image data set it is made for, a key of afmp.data.stats.STATS, or None)."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    if data is not None and data not in STATS:
        raise ValueError(f"unknown data set {data!r} for {name!r}; known: {', '.join(STATS)}")
    config_fields(model_cls)  # fails early if the family has no Config dataclass
    _check_keys(name, model_cls, preset)
    _MODELS[name] = (model_cls, dict(preset))
    _DATA[name] = data
    _register_with_timm(name)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted. ``pattern``: a shell-style wildcard as in timm
    (``"afmp_*"``, ``"*_vit_t?n"``), or without wildcards a substring."""
    names = sorted(_MODELS)
    if pattern is None:
        return names
    if any(c in pattern for c in "*?["):
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return [n for n in names if pattern in n]


def default_name(model_cls: type[nn.Module]) -> str:
    """The first preset registered for ``model_cls``: the name a model built from its class
    is saved under (its full config is saved too, so any preset of the class rebuilds it)."""
    for name, (cls, _) in _MODELS.items():
        if cls is model_cls:
            return name
    raise ValueError(f"{model_cls.__name__} has no registered preset; register one to save it")


def pretrained_cfg(name: str, cfg) -> dict:
    """timm's description of a model built from preset ``name`` with config ``cfg``: input
    size, normalisation of its data, classes, and the classifier's and first layer's names."""
    out = {
        "architecture": name,
        "num_classes": cfg.num_classes,
        "classifier": "head",
        "license": "mit",
        "tag": "",
        "hf_hub_id": None,
        "url": None,
    }
    if hasattr(cfg, "img_size"):  # an image model
        out.update(
            input_size=(cfg.in_chans, cfg.img_size, cfg.img_size),
            fixed_input_size=False,
            interpolation="bicubic",
            crop_pct=1.0,
            first_conv="patch_embed.proj",
        )
        data = _DATA.get(name)
        if data is not None and len(STATS[data][0]) == cfg.in_chans:
            out["mean"], out["std"] = STATS[data]
    elif hasattr(cfg, "pos_dim"):  # a point-set model: a batch dict of afmp.data.points in
        out.update(first_conv="embed", in_features=cfg.in_features, pos_dim=cfg.pos_dim)
    else:  # a sequence model: token ids in, no normalisation
        out.update(first_conv="embed", max_len=cfg.max_len, vocab_size=cfg.vocab_size)
    return out


def model_entry(name: str) -> tuple[type[nn.Module], dict]:
    """(model class, preset dict) of a registered name."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    model_cls, preset = _MODELS[name]
    return model_cls, dict(preset)


def config_fields(model_cls: type[nn.Module]) -> list[str]:
    cfg_cls = getattr(model_cls, "Config", None)
    if cfg_cls is None or not dataclasses.is_dataclass(cfg_cls):
        raise TypeError(f"{model_cls.__name__} needs a nested dataclass named Config")
    return [f.name for f in dataclasses.fields(cfg_cls)]


def resolve_config(name: str, **overrides):
    """The full Config a ``create_model(name, **overrides)`` call would use."""
    model_cls, preset = model_entry(name)
    _check_keys(name, model_cls, overrides)
    _check_types(name, model_cls, overrides)
    return model_cls.Config(**{**preset, **overrides})


def create_model(name: str, **overrides) -> nn.Module:
    """Build registered model ``name``; ``overrides`` are fields of its Config."""
    model_cls, _ = model_entry(name)
    model = model_cls(resolve_config(name, **overrides))
    model.model_name = name
    model.pretrained_cfg = model.default_cfg = pretrained_cfg(name, model.cfg)
    if hasattr(model, "first_conv"):  # a family whose first layer is not a patch embedding
        model.pretrained_cfg["first_conv"] = model.first_conv
    return model


def model_args_for_data(name: str, data_args: dict, user_opts: dict) -> dict:
    """Config overrides that fit model ``name`` to the data; the user's own options win.

    For an image model whose preset was made for another resolution, the patch size
    is scaled to keep the preset's token grid (AFMP-Tiny: 32/8 on CIFAR, 8/2 on digits).
    """
    model_cls, preset = model_entry(name)
    fields = config_fields(model_cls)
    args = {k: v for k, v in data_args.items() if k in fields}
    img = args.get("img_size")
    if img and "patch_size" in fields and "patch_size" not in user_opts and "img_size" not in user_opts:
        grid = preset.get("img_size", img) // preset.get("patch_size", 1)
        divisors = [p for p in range(1, img + 1) if img % p == 0]
        args["patch_size"] = min(divisors, key=lambda p: (abs(img // p - grid), p))
    return {**args, **user_opts}


def check_positive_ints(cfg, *names: str, minimum: int = 1) -> None:
    """For a Config's ``__post_init__``: each named field must be an int >= ``minimum`` (a bool is not)."""
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ValueError(f"{name} must be {what}, got {value!r}")


def check_one_of(cfg, name: str, choices) -> None:
    """For a Config's ``__post_init__``: field ``name`` must be one of ``choices``."""
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_keys(name: str, model_cls: type[nn.Module], kwargs: dict) -> None:
    valid = config_fields(model_cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for model {name!r}; valid options: {', '.join(valid)}"
        )


def _check_types(name: str, model_cls: type[nn.Module], kwargs: dict) -> None:
    """Options typed bool, int, float or str must be one (YAML's "maybe" is no bool, nan no weight)."""
    hints = typing.get_type_hints(model_cls.Config)
    for key, value in kwargs.items():
        expected = hints.get(key)
        if expected is bool:
            ok = isinstance(value, bool)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif expected is str:
            ok = isinstance(value, str)
        else:  # unions, tuples, None-able fields: their Config checks them
            continue
        if not ok:
            what = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[
                expected
            ]
            raise ValueError(f"option {key} of model {name!r} must be {what}, got {value!r}")


def _register_with_timm(name: str) -> None:
    """Expose ``name`` through timm.create_model (timm keys models by function name)."""
    try:
        from timm.models import register_model as timm_register
    except ImportError:  # timm is a dependency, but the registry itself does not need it
        return

    def entrypoint(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"no pretrained weights are published for {name!r}; use pretrained=False")
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        return create_model(name, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    # timm files each entrypoint under its module's name; give ours a module of their own.
    module_name = "afmp.timm_models"
    if module_name not in sys.modules:
        sys.modules[module_name] = types.ModuleType(module_name)
    entrypoint.__module__ = module_name
    setattr(sys.modules[module_name], name, entrypoint)
    timm_register(entrypoint)
