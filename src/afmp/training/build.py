"""A TrainingRun built from a checked Setup: the EMA, the counted FLOPs for MFU, the
distributed and compiled wrappers, loaders, AdamW, the schedule and the gradient scaler.
It writes config.yaml (the resolved settings) and nothing else; call it holding the lock."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from afmp.training import batch_size as batch_sizing
from afmp.training import compiling, rundir
from afmp.training import distributed as ddp
from afmp.training.checkpoint import model_spec, unwrap
from afmp.training.ema import WeightEMA
from afmp.training.epoch import cached_peak_flops, flops_per_train_image, make_scheduler, param_groups
from afmp.training.prepare import Setup
from afmp.training.run import EpochHook, Progress, TrainingRun
from afmp.utils.files import atomic_write
from afmp.utils.runtime import batch_elements, busy_warning, machine_state


def make_loader(setup: Setup, split, sampler) -> DataLoader:
    cfg, device = setup.cfg, setup.device
    return DataLoader(
        split,
        batch_size=ddp.local_batch_size(cfg.batch_size, setup.env),
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=setup.data.collate_fn,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


def build_run(setup: Setup, on_epoch: EpochHook | None = None) -> TrainingRun:
    cfg, env, device, data, model = setup.cfg, setup.env, setup.device, setup.data, setup.model
    out = Path(cfg.out)
    log = print if env.is_main else lambda *a, **k: None
    if env.is_main:
        for path in rundir.clean_temporaries(out):
            log(f"removed {path}, left by an interrupted write")
    ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay else None
    # Throughput and MFU: the counted FLOPs of a training image against the device's peak
    # matmul rate as `afmp bench` measured it (MFU is left empty until it has). Counted before
    # DistributedDataParallel wraps the model: its gradient hooks must see training steps only.
    example = batch_sizing.example_batches(model, data.model_args, device)
    flops_per_image = flops_per_train_image(model, example)
    # Sequences are fed padded to their batch's longest, not to the data's longest (the
    # example's length): MFU scales the count by the length fed, taking FLOPs as linear in it.
    example_size = batch_elements(example(1)[0])
    model = ddp.wrap(model, env, device)
    train_sampler = ddp.train_sampler(
        data.train,
        env,
        seed=cfg.seed * 100_003,
        group_batch=cfg.batch_size if cfg.group_by_length else None,
    )
    steps_per_epoch = math.ceil(len(train_sampler) / ddp.local_batch_size(cfg.batch_size, env))
    # The training steps only; validation and test run the plain module.
    choice = compiling.choose(cfg.compile, device, cfg.epochs * steps_per_epoch)
    model = compiling.compiled(model, choice)
    # The threads and the load: what the run's times and images/s depend on besides the code.
    machine = machine_state()
    resolved = {**dataclasses.asdict(cfg), "resolved_model": model_spec(model), "machine": machine}
    resolved["compile_resolved"] = {"mode": choice.mode, "reason": choice.reason}
    warning = busy_warning(machine) if device.type == "cpu" and env.is_main else None
    if warning:
        log(warning)
    if env.is_main:
        text = yaml.safe_dump(resolved, sort_keys=False)
        atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(text))
    optimizer = torch.optim.AdamW(
        param_groups(unwrap(model), cfg.weight_decay, cfg.weight_decay_on), lr=cfg.lr
    )
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    tb = None
    if cfg.tensorboard and env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tb"))
    return TrainingRun(
        cfg=cfg,
        env=env,
        device=device,
        data=data,
        out=out,
        log=log,
        model=model,
        # What is validated, tested and saved as model.safetensors: the average when there is one.
        final=ema.module if ema is not None else unwrap(model),
        compile_choice=choice,
        ema=ema,
        params=sum(p.numel() for p in model.parameters()),
        resolved=resolved,
        flops_per_image=flops_per_image,
        example_size=example_size,
        peak_flops=cached_peak_flops(device, cfg.amp),
        train_sampler=train_sampler,
        # One loader for every epoch: the sampler's set_epoch draws each epoch's order.
        train_loader=make_loader(setup, data.train, train_sampler),
        val_loader=make_loader(setup, data.val, ddp.ShardSampler(data.val, env)),
        test_loader=make_loader(setup, data.test, ddp.ShardSampler(data.test, env)),
        optimizer=optimizer,
        scheduler=make_scheduler(cfg, optimizer, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.amp and not bf16),
        progress=Progress(),
        committed=setup.resume_from,
        tb=tb,
        on_epoch=on_epoch,
    )
