"""The ``afmp`` command: one console script, one module per subcommand.

Each subcommand module has ``add_arguments(parser)`` and ``main(args) -> int``; it
is imported only when that subcommand runs. This module lives outside the ``afmp``
package on purpose: importing ``afmp`` registers every model (torch, timm, torchvision:
seconds), and ``afmp --help`` needs none of that.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("afmp.commands.models", "list the registered models"),
    "train": ("afmp.commands.train", "train a registered model on a data set"),
    "eval": ("afmp.commands.evaluate", "evaluate a checkpoint: confusion matrix and per-class accuracy"),
    "predict": ("afmp.commands.predict", "the top classes of image files, by a trained run"),
    "compare": ("afmp.commands.compare", "one table of runs: params, FLOPs, latency, accuracy"),
    "bench": (
        "afmp.bench.cli",
        "measure time, memory, FLOPs and bytes as models scale; Pareto of trained runs",
    ),
    "tune": (
        "afmp.commands.tune",
        "search a model's training recipe (Optuna): trials on validation data, the best as a config",
    ),
    "ablate": ("afmp.studies.ablate", "run an ablation study (sparsity, lambda, topdown) over seeds"),
    "reproduce": (
        "afmp.studies.reproduce",
        "run one of the paper's studies from a shipped config, with a report",
    ),
    "export": (
        "afmp.commands.export",
        "a trained run as an ONNX file or a pt2 program, checked against PyTorch",
    ),
    "viz": ("afmp.commands.viz", "draw a trained model's gates: graph over images, sparsity, histogram"),
    "listops": (
        "afmp.commands.listops",
        "LRA ListOps: write its files (generate), or what a model must beat (baselines)",
    ),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afmp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported (and only it adds arguments).
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if args.command is None:
        build_parser([]).print_help()
        return 2
    from afmp.utils.errors import UsageError

    try:
        return importlib.import_module(COMMANDS[args.command][0]).main(args) or 0
    except UsageError as err:
        # Bad input is the user's to fix: say what was expected, without a traceback. Any
        # other exception is a bug, and its traceback is what a report needs.
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"afmp {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
