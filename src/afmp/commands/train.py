"""`afmp train`: the command line of the training loop (afmp.training.train).

Multi-process: ``torchrun --nproc_per_node=N -m afmp.commands.train ...`` takes the same
flags as ``afmp train`` (see afmp.training.distributed).
"""

from __future__ import annotations

import argparse

from afmp.training.config import TrainConfig, add_arguments, config_from_args
from afmp.training.run import EpochHook
from afmp.training.train import train
from afmp.utils.errors import usage_errors

__all__ = ["add_arguments", "epoch_hook", "main"]


def epoch_hook(cfg: TrainConfig) -> EpochHook | None:
    """What the command adds after each epoch: the gate figures every --viz-every epochs."""
    if not cfg.viz_every:
        return None
    from afmp.commands import viz  # matplotlib, only when asked for

    return viz.every(cfg.viz_every)


def main(args: argparse.Namespace) -> int:
    with usage_errors():
        cfg = config_from_args(args)
    train(cfg, on_epoch=epoch_hook(cfg))
    return 0


if (
    __name__ == "__main__"
):  # torchrun --nproc_per_node=N -m afmp.commands.train ... (same flags as afmp train)
    import sys

    from afmp_cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
