"""One readable training loop for every registered model (the command: afmp.commands.train).

The settings (TrainConfig, their checks and the command line) are in afmp.training.config;
the resolved settings (model config included) are written beside the results. ``train``
reads top to bottom: ``prepare`` checks everything and builds data and model, then
``build_run`` makes a ``TrainingRun``, which resumes, runs its epochs and finishes. The run directory gets:

    config.yaml               resolved settings
    results.json              accuracies, history, params, peak memory (strict JSON)
    model.safetensors/.json   the tested weights (see SELECT) and the model's config
    last.safetensors/.json    latest weights
    checkpoints/epoch-N/      the same four files and state.pt (optimizer, schedule,
                              Progress), committed whole with checksums: what --resume reads
    history.csv               one row per epoch (and tb/ for TensorBoard with --tensorboard)

Every setting, the data and the model are checked before anything is written, and one
process at a time writes a run directory (afmp.training.rundir).

Multi-process (DistributedDataParallel): ``torchrun --nproc_per_node=N -m afmp.commands.train ...``
(or ``torchrun $(which afmp) train ...``); ``--batch-size`` stays the global batch,
rank 0 alone writes files, see afmp.training.distributed.
"""

from __future__ import annotations

import contextlib

import torch

from afmp.training import rundir
from afmp.training.build import build_run
from afmp.training.config import TrainConfig
from afmp.training.prepare import prepare
from afmp.training.run import EpochHook
from afmp.utils.errors import usage_errors

__all__ = ["TrainConfig", "train"]


def train(cfg: TrainConfig, on_epoch: EpochHook | None = None, *, test: bool = True) -> dict:
    """Train, save and test the selected weights (SELECT); returns results.json's dict.
    ``on_epoch(run, epoch)`` runs on the writing rank after each committed epoch.
    ``test=False`` reads no test example (a search chooses on validation data alone:
    afmp.tuning); results.json's test_accuracy is then null."""
    with usage_errors():
        setup = prepare(cfg)
    cfg = setup.cfg  # --auto-batch may have lowered the batch size
    lock = rundir.RunLock(cfg.out) if setup.env.is_main else contextlib.nullcontext()
    with lock:
        run = build_run(setup, on_epoch)
        if setup.resume_from is not None:
            run.resume(setup.resume_from, setup.resume_state)
        if setup.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(setup.device)
        data = setup.data
        run.log(
            f"{cfg.model} on {cfg.dataset}: {run.params / 1e6:.3f}M parameters, {len(data.train)} train / "
            f"{len(data.val)} val / {len(data.test)} test, device {setup.device}, "
            f"{setup.env.world_size} process(es), {run.compile_choice.describe()}"
        )
        for epoch in range(run.progress.epoch + 1, cfg.epochs):
            run.run_epoch(epoch)
        return run.finish(test=test)
