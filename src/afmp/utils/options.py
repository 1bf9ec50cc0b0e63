"""Reading ``KEY=VALUE`` options, the one syntax every subcommand takes them in.

``afmp train -o sparsity=0.5``, ``afmp bench --model-opt d_model=64``, the bench's
model specs ``afmp_small@backend=stencil`` and ``afmp reproduce --set train.epochs=2``
all pass through ``parse_key_value``: the value is read as YAML (``0.5``, ``false``,
``[1, 2]``), and a malformed pair is an error that names the flag and an example.
"""

from __future__ import annotations

from typing import Any

import yaml


def parse_key_value(pair: str, *, flag: str = "an option", example: str = "KEY=VALUE") -> tuple[str, Any]:
    """``"sparsity=0.5"`` -> ("sparsity", 0.5); the value is read as YAML."""
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{flag} expects KEY=VALUE (e.g. {example}), got {pair!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ValueError(f"{flag} {pair!r}: the value is not valid YAML ({err.problem})") from None


def parse_key_values(pairs: list[str] | None, *, flag: str = "an option", example: str = "KEY=VALUE") -> dict:
    """``["sparsity=0.5", "use_top_down=false"]`` -> {"sparsity": 0.5, "use_top_down": False}."""
    return dict(parse_key_value(pair, flag=flag, example=example) for pair in pairs or [])
