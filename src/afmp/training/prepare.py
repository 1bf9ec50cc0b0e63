"""Before a run writes anything: every setting checked, data and model built, and the
checkpoint that --resume continues found (``prepare`` returns them as a ``Setup``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from afmp.data import DataBundle, build_dataset
from afmp.registry import create_model, model_args_for_data
from afmp.training import batch_size as batch_sizing
from afmp.training import distributed as ddp
from afmp.training import rundir
from afmp.training.checkpoint import model_spec, read_state, saved_config
from afmp.training.config import TrainConfig, check_config
from afmp.training.run import Progress
from afmp.utils.errors import UsageError
from afmp.utils.runtime import autocast, resolve_device, seed_everything, use_threads


def check_same_model(spec_path: Path, model) -> None:
    """--resume continues the model a run saved: its config (but the backend) must be today's."""
    _, saved = saved_config(spec_path)
    built = model_spec(model)["config"]
    changed = sorted(k for k in set(saved) | set(built) if k != "backend" and saved.get(k) != built.get(k))
    if changed:
        diff = ", ".join(f"{k}={saved.get(k)!r} (now {built.get(k)!r})" for k in changed)
        raise ValueError(
            f"--resume: {spec_path.parent} was saved with {diff}; pass the same with -o KEY=VALUE to continue it"
        )


def state_keys(cfg: TrainConfig) -> list[str]:
    """What a checkpoint's state.pt must hold for this run to continue from it
    (``TrainingRun.commit`` writes them, ``TrainingRun.resume`` reads them)."""
    progress = [f.name for f in dataclasses.fields(Progress)]
    return [*progress, "optimizer", "scheduler", "scaler", *(["ema"] if cfg.ema_decay else [])]


@dataclass
class Setup:
    """What a run needs, all of it checked; nothing written yet."""

    cfg: TrainConfig
    env: ddp.DistEnv
    device: torch.device
    data: DataBundle
    model: torch.nn.Module
    resume_from: Path | None  # the committed checkpoint folder --resume continues
    resume_state: dict | None  # its state.pt, read and checked


def prepare(cfg: TrainConfig) -> Setup:
    """Check the settings, build data and model, find what --resume continues; write nothing."""
    check_config(cfg)
    use_threads(cfg.threads)
    out = Path(cfg.out)
    env, device = ddp.init(resolve_device(cfg.device))
    seed_everything(cfg.seed)  # the same seed on every rank: the same initial weights
    data = build_dataset(
        cfg.dataset,
        data_dir=cfg.data_dir,
        download=cfg.download,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        **cfg.data_opts,
    )
    if cfg.group_by_length and not hasattr(data.train, "lengths"):
        raise UsageError(
            f"--group-by-length needs a data set of sequences (agnews, imdb, listops); "
            f"{cfg.dataset!r} has no lengths to group by"
        )
    model = create_model(cfg.model, **model_args_for_data(cfg.model, data.model_args, cfg.model_opts))
    resume_from = resume_state = None
    if cfg.resume:
        resume_from, skipped = rundir.latest_checkpoint(out)
        if resume_from is None:
            why = f": {skipped[0]}" if skipped else ""
            old = " (its last_state.pt is from an older afmp, whose checkpoints cannot be verified)"
            raise UsageError(
                f"--resume: {out} holds no checkpoint to continue{why}"
                f"{old if (out / 'last_state.pt').exists() else ''}; run without --resume to start it"
            )
        for reason in skipped:
            print(f"--resume: skipping a newer checkpoint: {reason}")
        check_same_model(resume_from / "last.json", model)
        resume_state = read_state(resume_from / "state.pt", state_keys(cfg), device)
    model = model.to(device)
    if cfg.auto_batch:
        if env.world_size > 1:
            raise UsageError("--auto-batch probes one process's memory; run it without torchrun")
        make_batch = batch_sizing.example_batches(model, data.model_args, device)
        found = batch_sizing.find_batch_size(
            model,
            make_batch,
            max_batch=cfg.batch_size,
            device=device,
            budget_mb=cfg.memory_budget_mb,
            autocast=lambda: autocast(device, cfg.amp),
        )
        cfg = dataclasses.replace(cfg, batch_size=found)
    return Setup(cfg, env, device, data, model, resume_from, resume_state)
