"""`afmp models`: the registry, with parameter counts."""

from __future__ import annotations

import argparse

from afmp.registry import create_model, list_models, model_entry


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("filter", nargs="?", help="only names containing this")
    p.add_argument("--params", action="store_true", help="also build each model and count its parameters")


def main(args: argparse.Namespace) -> int:
    for name in list_models(args.filter):
        model_cls, preset = model_entry(name)
        line = f"{name:28s} {model_cls.__name__:16s} " + " ".join(f"{k}={v}" for k, v in preset.items())
        if args.params:
            line += f"  params={sum(p.numel() for p in create_model(name).parameters()) / 1e6:.2f}M"
        print(line)
    return 0
