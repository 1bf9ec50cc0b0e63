"""`afmp train`: one readable training loop for every registered model.

The settings (TrainConfig, their checks and the command line) are in afmp.train_config;
the resolved settings (model config included) are written beside the results. ``train``
reads top to bottom: ``prepare`` checks everything and builds data and model, then a
``TrainingRun`` resumes, runs its epochs and finishes. The run directory gets:

    config.yaml               resolved settings
    results.json              accuracies, history, params, peak memory (strict JSON)
    model.safetensors/.json   the tested weights (see SELECT) and the model's config
    last.safetensors/.json    latest weights
    checkpoints/epoch-N/      the same four files and state.pt (optimizer, schedule,
                              Progress), committed whole with checksums: what --resume reads
    history.csv               one row per epoch (and tb/ for TensorBoard with --tensorboard)

Every setting, the data and the model are checked before anything is written, and one
process at a time writes a run directory (afmp.rundir).

Multi-process (DistributedDataParallel): ``torchrun --nproc_per_node=N -m afmp.train ...``
(or ``torchrun $(which afmp) train ...``); ``--batch-size`` stays the global batch,
rank 0 alone writes files, see afmp.distributed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from afmp import batch_size as batch_sizing
from afmp import distributed as ddp
from afmp import rundir
from afmp.checkpoint import model_spec, read_weights, save_checkpoint, saved_config, unwrap
from afmp.data import DataBundle, build_dataset
from afmp.ema import WeightEMA
from afmp.errors import UsageError, usage_errors
from afmp.files import atomic_write, write_csv, write_json
from afmp.losses import auxiliary_loss
from afmp.registry import create_model, model_args_for_data
from afmp.runtime import (
    autocast,
    busy_warning,
    machine_state,
    peak_memory_mb,
    resolve_device,
    seed_everything,
    to_device,
    use_threads,
)
from afmp.train_config import TrainConfig, add_arguments, check_config, config_from_args

__all__ = ["TrainConfig", "add_arguments", "config_from_args", "main", "train"]


# -- set-up -------------------------------------------------------------------------------
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


def make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "max", patience=5, factor=0.2)
    if cfg.scheduler == "cosine":
        warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch))
        total = max(warmup + 1, cfg.epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    raise ValueError(f"unknown scheduler {cfg.scheduler!r}; choose cosine or plateau")


@dataclass
class Setup:
    """What a run needs, all of it checked; nothing written yet."""

    cfg: TrainConfig
    env: ddp.DistEnv
    device: torch.device
    data: DataBundle
    model: torch.nn.Module
    resume_from: Path | None  # the committed checkpoint folder --resume continues


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
    resume_from = None
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
    return Setup(cfg, env, device, data, model, resume_from)


# The files of an epoch's checkpoint that are also published at the top of the run directory.
PUBLISHED = ("model.safetensors", "model.json", "last.safetensors", "last.json")


def publish(folder: Path, out: Path) -> None:
    """Copy a committed checkpoint's weights to the run directory's top (weights before JSON)."""
    for name in PUBLISHED:
        atomic_write(out / name, lambda tmp, src=folder / name: shutil.copyfile(src, tmp))


# -- one epoch ----------------------------------------------------------------------------
def mixup(inputs, labels, alpha: float):
    """Mixup (Zhang et al. 2018): (inputs blended with a shuffled copy, the copy's labels, weight)."""
    if alpha < 0:
        raise ValueError(f"mixup_alpha must be >= 0 (0 = off), got {alpha}")
    if alpha == 0:
        return inputs, labels, 1.0
    if not (isinstance(inputs, torch.Tensor) and inputs.is_floating_point()):
        raise ValueError("mixup blends image batches; this data set's inputs are not: use mixup_alpha=0")
    lam = float(np.random.beta(alpha, alpha))
    perm = torch.randperm(labels.shape[0], device=labels.device)
    return lam * inputs + (1 - lam) * inputs[perm], labels[perm], lam


def param_groups(model, weight_decay: float, decay_on: str) -> list[dict]:
    """AdamW's groups. ``decay_on="weights"``: no decay for norms, biases (every parameter of
    fewer than two dimensions), embedding tables and position embeddings."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay_on == "all":
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    tables = {
        f"{prefix}.weight" if prefix else "weight"
        for prefix, module in model.named_modules()
        if isinstance(module, torch.nn.Embedding)
    }

    def exempt(name: str, p) -> bool:
        return p.ndim < 2 or name in tables or name.startswith(("pos_embed", "cls_token"))

    return [
        {"params": [p for n, p in params if not exempt(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in params if exempt(n, p)], "weight_decay": 0.0},
    ]


def flops_per_train_image(model, make_batch) -> float:
    """Counted FLOPs of training on one image (forward, loss, backward), as c(3) - c(2).

    Counted in eval mode, so that no BatchNorm statistics move and no dropout is drawn,
    and the gradients are cleared after: the count leaves no trace on the training.
    """
    from afmp.bench.counting import count

    was_training = model.training
    model.eval()

    def step(batch: int):
        model.zero_grad(set_to_none=True)  # else the second backward also counts adding into .grad
        x, y = make_batch(batch)

        def run():
            logits, aux = model(x, return_aux=True)
            loss = F.cross_entropy(logits.flatten(0, -2).float(), y.flatten()) + auxiliary_loss(aux, logits)
            loss.backward()

        return count(run).total_flops

    try:
        return step(3) - step(2)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


class EpochStats(NamedTuple):
    loss: float
    accuracy: float
    sparsity: float
    input_size: float  # elements of an example's input as fed, padding included, on average


def train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, device, desc, ema=None) -> EpochStats:
    model.train()
    totals = {"loss": 0.0, "correct": 0, "seen": 0, "sparsity": 0.0, "elements": 0}
    for inputs, labels in tqdm(loader, desc=desc, leave=False, disable=None):
        inputs, labels = to_device(inputs, device), labels.to(device)
        inputs, mixed_labels, lam = mixup(inputs, labels, cfg.mixup_alpha)
        with autocast(device, cfg.amp):
            logits, aux = model(inputs, return_aux=True)
            task_loss = lam * F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            if lam < 1:
                task_loss = task_loss + (1 - lam) * F.cross_entropy(
                    logits.float(), mixed_labels, label_smoothing=cfg.label_smoothing
                )
            reg = auxiliary_loss(aux, task_loss)
            loss = task_loss + reg
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(unwrap(model))
        if cfg.scheduler == "cosine":
            scheduler.step()
        n = labels.shape[0]
        totals["loss"] += task_loss.item() * n
        totals["sparsity"] += float(reg.detach()) * n
        totals["correct"] += (logits.argmax(-1) == labels).sum().item()
        totals["seen"] += n
        totals["elements"] += inputs.numel()
    totals = dict(zip(totals, ddp.all_reduce_sum(list(totals.values()), device)))  # over ranks
    seen = max(totals["seen"], 1)
    return EpochStats(
        totals["loss"] / seen,
        100.0 * totals["correct"] / seen,
        totals["sparsity"] / seen,
        totals["elements"] / seen,
    )


@torch.no_grad()
def accuracy(model, loader, device, amp: bool = True) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = seen = 0
    for inputs, labels in loader:
        inputs, labels = to_device(inputs, device), labels.to(device)
        with autocast(device, amp):
            logits = model(inputs)
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += labels.shape[0]
    correct, seen = ddp.all_reduce_sum([correct, seen], device)  # each rank saw one shard
    return 100.0 * correct / max(seen, 1)


def cached_peak_flops(device: torch.device, amp: bool) -> float | None:
    """The device's peak matmul FLOP/s in the training's precision, if `afmp bench` measured it."""
    from afmp.bench import roofline

    dtype = (
        torch.bfloat16 if device.type == "cuda" and amp and torch.cuda.is_bf16_supported() else torch.float32
    )
    if device.type == "cuda" and amp and dtype is torch.float32:
        dtype = torch.float16
    calib = roofline.cached(device, dtype)
    return calib["peak_flops_per_s"] if calib else None


def log_epoch(out: Path, history: dict, tb, lr: float) -> None:
    """history.csv (rewritten whole: it is one row per epoch) and, when on, TensorBoard scalars."""

    rows = [{"epoch": i + 1, **dict(zip(history, row))} for i, row in enumerate(zip(*history.values()))]
    write_csv(out / "history.csv", rows, ["epoch", *history])
    if tb is not None:
        epoch = len(history["val_acc"])
        for key, values in history.items():
            if values[-1] is not None:
                tb.add_scalar(key, values[-1], epoch)
        tb.add_scalar("lr", lr, epoch)


# -- the run ------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where a run stands after an epoch: what state.pt saves and --resume restores."""

    epoch: int = -1  # the last finished epoch (0-based); -1 before the first
    history: dict = field(default_factory=lambda: {key: [] for key in HISTORY})
    best_val: float = -1.0
    best_epoch: int = -1
    selected_epoch: int = -1  # the epoch whose weights are model.* (see SELECT)


# One column of history.csv (and of results.json's training_history) each, in this order.
HISTORY = ("train_loss", "train_acc", "val_acc", "sparsity_loss", "time", "images_per_s", "mfu")


class TrainingRun:
    """One run's model, optimizer, loaders and Progress, and the steps ``train`` takes over them:
    ``resume`` from a checkpoint, ``run_epoch`` (train, validate, log, commit), ``finish``."""

    def __init__(self, setup: Setup):
        cfg, env, device, data, model = setup.cfg, setup.env, setup.device, setup.data, setup.model
        self.cfg, self.env, self.device, self.data = cfg, env, device, data
        self.out = Path(cfg.out)
        self.log = print if env.is_main else lambda *a, **k: None
        if env.is_main:
            for path in rundir.clean_temporaries(self.out):
                self.log(f"removed {path}, left by an interrupted write")
        self.ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay else None
        # Throughput and MFU: the counted FLOPs of a training image against the device's peak
        # matmul rate as `afmp bench` measured it (MFU is left empty until it has). Counted before
        # DistributedDataParallel wraps the model: its gradient hooks must see training steps only.
        example = batch_sizing.example_batches(model, data.model_args, device)
        self.flops_per_image = flops_per_train_image(model, example)
        # Sequences are fed padded to their batch's longest, not to the data's longest (the
        # example's length): MFU scales the count by the length fed, taking FLOPs as linear in it.
        self.example_size = example(1)[0].numel()
        self.peak_flops = cached_peak_flops(device, cfg.amp)
        model = ddp.wrap(model, env, device)
        if cfg.compile:  # the training steps only; validation and test run the plain module
            model = torch.compile(model)
        self.model = model
        # What is validated, tested and saved as model.safetensors: the average when there is one.
        self.final = self.ema.module if self.ema is not None else unwrap(model)
        self.params = sum(p.numel() for p in model.parameters())
        # The threads and the load: what the run's times and images/s depend on besides the code.
        machine = machine_state()
        self.resolved = {**dataclasses.asdict(cfg), "resolved_model": model_spec(model), "machine": machine}
        warning = busy_warning(machine) if device.type == "cpu" and env.is_main else None
        if warning:
            self.log(warning)
        if env.is_main:
            text = yaml.safe_dump(self.resolved, sort_keys=False)
            atomic_write(self.out / "config.yaml", lambda tmp: tmp.write_text(text))
        self.val_loader = self.loader(data.val, ddp.ShardSampler(data.val, env))
        self.test_loader = self.loader(data.test, ddp.ShardSampler(data.test, env))
        self.train_sampler = ddp.train_sampler(
            data.train,
            env,
            seed=cfg.seed * 100_003,
            group_batch=cfg.batch_size if cfg.group_by_length else None,
        )
        steps_per_epoch = math.ceil(len(self.train_sampler) / ddp.local_batch_size(cfg.batch_size, env))
        self.optimizer = torch.optim.AdamW(
            param_groups(unwrap(model), cfg.weight_decay, cfg.weight_decay_on), lr=cfg.lr
        )
        self.scheduler = make_scheduler(cfg, self.optimizer, steps_per_epoch)
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=device.type == "cuda" and cfg.amp and not bf16
        )
        self.progress = Progress()
        self.committed = setup.resume_from  # the newest committed checkpoint folder
        self.tb = None
        if cfg.tensorboard and env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"))

    def loader(self, split, sampler) -> DataLoader:
        return DataLoader(
            split,
            batch_size=ddp.local_batch_size(self.cfg.batch_size, self.env),
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=self.data.collate_fn,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )

    # -- the steps ------------------------------------------------------------------------
    def resume(self, folder: Path) -> None:
        """Load weights, optimizer, schedule, scaler, EMA and Progress from a committed checkpoint."""
        state = torch.load(folder / "state.pt", map_location=self.device, weights_only=True)
        unwrap(self.model).load_state_dict(
            read_weights(folder / "last.safetensors", folder / "last.json", self.device)
        )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.progress = Progress(**{f.name: state[f.name] for f in dataclasses.fields(Progress)})
        history = self.progress.history
        for key in HISTORY:  # a run saved before images_per_s and mfu were recorded
            history.setdefault(key, [None] * len(history["val_acc"]))
        if self.env.is_main:
            publish(folder, self.out)  # a crash may have stopped the previous publish half-way
        self.log(f"resuming {self.out} at epoch {self.progress.epoch + 2}")

    def run_epoch(self, epoch: int) -> None:
        """Train one epoch, validate, log it, and commit its checkpoint."""
        cfg, env = self.cfg, self.env
        # Re-seeding per epoch makes a resumed run draw the same batches as an unbroken one;
        # the sampler's permutation is shared by all ranks, their augmentation seeds are not.
        seed_everything(cfg.seed * 100_003 + epoch + 1_000_003 * env.rank)
        self.train_sampler.set_epoch(epoch)
        started = time.perf_counter()
        stats = train_one_epoch(
            self.model,
            self.loader(self.data.train, self.train_sampler),
            self.optimizer,
            self.scheduler,
            self.scaler,
            cfg,
            self.device,
            f"epoch {epoch + 1}/{cfg.epochs}",
            self.ema,
        )
        images_per_s = len(self.train_sampler) * env.world_size / (time.perf_counter() - started)
        flops_per_image = self.flops_per_image * stats.input_size / self.example_size
        mfu = flops_per_image * images_per_s / self.peak_flops if self.peak_flops else None
        val_acc = accuracy(self.final, self.val_loader, self.device, cfg.amp)
        if cfg.scheduler == "plateau":
            self.scheduler.step(val_acc)
        p = self.progress
        elapsed = time.perf_counter() - started
        values = (stats.loss, stats.accuracy, val_acc, stats.sparsity, elapsed, images_per_s, mfu)
        for key, value in zip(HISTORY, values, strict=True):
            p.history[key].append(value)
        self.log(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {stats.loss:.4f}  train {stats.accuracy:.2f}%  "
            f"val {val_acc:.2f}%  sparsity-loss {stats.sparsity:.2e}  {elapsed:.1f}s  {images_per_s:.0f} img/s"
            + (f"  MFU {100 * mfu:.2f}%" if mfu is not None else "")
        )
        p.epoch = epoch
        improved = val_acc >= p.best_val  # ties: the later epoch (see SELECT)
        if improved:
            p.best_val, p.best_epoch = val_acc, epoch
        selected = improved if cfg.select == "best_val" else True
        if selected:
            p.selected_epoch = epoch
        if env.is_main:
            self.commit(epoch, val_acc, selected)
        ddp.barrier()  # the other ranks read these files at the end (and on --resume)

    def commit(self, epoch: int, val_acc: float, selected: bool) -> None:
        """Write the epoch's checkpoint folder whole, publish it, and log the history."""
        state = {
            **dataclasses.asdict(self.progress),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }
        previous = self.committed

        def fill(folder: Path) -> None:
            if selected:
                save_checkpoint(self.final, folder, "model", epoch=epoch, val_accuracy=val_acc)
            else:  # the selected weights stay those of an earlier epoch
                for name in ("model.safetensors", "model.json"):
                    shutil.copyfile(previous / name, folder / name)
            save_checkpoint(self.model, folder, "last", epoch=epoch)
            torch.save(state, folder / "state.pt")

        self.committed = rundir.commit_checkpoint(self.out, epoch, fill)
        publish(self.committed, self.out)
        log_epoch(self.out, self.progress.history, self.tb, lr=self.optimizer.param_groups[0]["lr"])
        viz_every = self.cfg.viz_every
        if viz_every and ((epoch + 1) % viz_every == 0 or epoch + 1 == self.cfg.epochs):
            from afmp import viz

            viz.epoch_hook(self.final, self.data, self.out, epoch + 1)

    def finish(self) -> dict:
        """Test the selected weights, write results.json, and return its dict."""
        cfg, p, device = self.cfg, self.progress, self.device
        self.final.load_state_dict(
            read_weights(self.out / "model.safetensors", self.out / "model.json", device)
        )
        test_acc = accuracy(self.final, self.test_loader, device, cfg.amp)
        peak, peak_source = peak_memory_mb(device)
        selected_val = p.history["val_acc"][p.selected_epoch]
        results = {
            "model": cfg.model,
            "dataset": cfg.dataset,
            "config": self.resolved,
            "params": self.params,
            "best_val_accuracy": p.best_val,
            "best_epoch": p.best_epoch + 1,
            "selected": cfg.select,
            "selected_epoch": p.selected_epoch + 1,
            "val_accuracy": selected_val,  # of the tested weights
            "test_accuracy": test_acc,
            "peak_memory_mb": peak,
            "peak_memory_source": peak_source,
            "device": str(device),
            "train_time_s": sum(p.history["time"]),
            "data": self.data.info,  # where the data came from, when the loader says (e.g. its file)
            "training_history": p.history,
        }
        if self.env.is_main:
            write_json(self.out / "results.json", results)
        if self.tb is not None:
            self.tb.close()
        self.log(
            f"best val {p.best_val:.2f}% (epoch {p.best_epoch + 1})  tested: epoch {p.selected_epoch + 1} "
            f"({cfg.select}), val {selected_val:.2f}%, test {test_acc:.2f}%  "
            f"train time {results['train_time_s']:.1f}s  -> {self.out}"
        )
        ddp.cleanup()
        return results


def train(cfg: TrainConfig) -> dict:
    """Train, save and test the selected weights (SELECT); returns results.json's dict."""
    with usage_errors():
        setup = prepare(cfg)
    cfg = setup.cfg  # --auto-batch may have lowered the batch size
    lock = rundir.RunLock(cfg.out) if setup.env.is_main else contextlib.nullcontext()
    with lock:
        run = TrainingRun(setup)
        if setup.resume_from is not None:
            run.resume(setup.resume_from)
        if setup.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(setup.device)
        data = setup.data
        run.log(
            f"{cfg.model} on {cfg.dataset}: {run.params / 1e6:.3f}M parameters, {len(data.train)} train / "
            f"{len(data.val)} val / {len(data.test)} test, device {setup.device}, "
            f"{setup.env.world_size} process(es)"
        )
        for epoch in range(run.progress.epoch + 1, cfg.epochs):
            run.run_epoch(epoch)
        return run.finish()


def main(args: argparse.Namespace) -> int:
    with usage_errors():
        cfg = config_from_args(args)
    train(cfg)
    return 0


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m afmp.train ... (same flags as afmp train)
    import sys

    from afmp_cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
