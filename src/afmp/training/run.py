"""A run's state and the steps ``train`` takes over it: ``resume`` from a committed
checkpoint, ``run_epoch`` (train, validate, log, commit) and ``finish`` (test, results.json).
``afmp.training.build`` builds it; ``Progress`` is what a checkpoint's state.pt restores."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from afmp.data import DataBundle
from afmp.training import compiling, rundir
from afmp.training import distributed as ddp
from afmp.training.checkpoint import read_weights, save_checkpoint, unwrap
from afmp.training.config import TrainConfig
from afmp.training.ema import WeightEMA
from afmp.training.epoch import accuracy, train_one_epoch
from afmp.utils.files import atomic_write, write_csv, write_json
from afmp.utils.runtime import peak_memory_mb, seed_everything


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


# The files of an epoch's checkpoint that are also published at the top of the run directory.
PUBLISHED = ("model.safetensors", "model.json", "last.safetensors", "last.json")


def publish(folder: Path, out: Path) -> None:
    """Copy a committed checkpoint's weights to the run directory's top (weights before JSON)."""
    for name in PUBLISHED:
        atomic_write(out / name, lambda tmp, src=folder / name: shutil.copyfile(src, tmp))


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


# Called on the writing rank after each epoch's checkpoint is committed, with the run and the
# epoch's number (1-based): how a command adds work per epoch (`afmp train --viz-every`).
EpochHook = Callable[["TrainingRun", int], None]


@dataclass(eq=False)
class TrainingRun:
    """One run's model, optimizer, loaders and Progress, and the steps ``train`` takes over them."""

    cfg: TrainConfig
    env: ddp.DistEnv
    device: torch.device
    data: DataBundle
    out: Path
    log: Callable[..., None]  # print on the writing rank, nothing on the others
    model: torch.nn.Module  # what the training steps run (wrapped for DDP, compiled)
    final: torch.nn.Module  # what is validated, tested and saved as model.*: the EMA when there is one
    ema: WeightEMA | None
    params: int
    resolved: dict  # config.yaml's settings
    flops_per_image: float  # counted training FLOPs of the example input
    example_size: int  # the example input's elements (MFU scales by the size fed)
    peak_flops: float | None  # the device's measured matmul peak, if `afmp bench` measured it
    train_sampler: Any
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    test_loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    progress: Progress
    committed: Path | None  # the newest committed checkpoint folder
    tb: Any = None  # a TensorBoard SummaryWriter, with --tensorboard
    on_epoch: EpochHook | None = None
    compile_choice: compiling.Choice = compiling.Choice("off", "as asked")
    compiled_once: bool = False  # whether this process has run a compiled step (and said how long it took)

    def resume(self, folder: Path, state: dict) -> None:
        """Load weights, optimizer, schedule, scaler, EMA and Progress from a committed checkpoint
        (``state``: its state.pt, read and checked by ``prepare``)."""
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
            self.train_loader,
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
        if self.compile_choice.mode != "off" and not self.compiled_once:
            self.compiled_once = True
            self.log(f"  compiled: the first step took {stats.first_step_s:.1f}s, compiling included")
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
            # The data's normalisation, class names and resizing go with the weights (timm's
            # pretrained_cfg keys), so that `afmp predict` needs the run directory alone.
            data_cfg = self.data.pretrained_cfg()
            if selected:
                save_checkpoint(
                    self.final, folder, "model", epoch=epoch, val_accuracy=val_acc, pretrained_cfg=data_cfg
                )
            else:  # the selected weights stay those of an earlier epoch
                for name in ("model.safetensors", "model.json"):
                    shutil.copyfile(previous / name, folder / name)
            save_checkpoint(self.model, folder, "last", epoch=epoch, pretrained_cfg=data_cfg)
            torch.save(state, folder / "state.pt")

        self.committed = rundir.commit_checkpoint(self.out, epoch, fill)
        publish(self.committed, self.out)
        log_epoch(self.out, self.progress.history, self.tb, lr=self.optimizer.param_groups[0]["lr"])
        if self.on_epoch is not None:
            self.on_epoch(self, epoch + 1)

    def finish(self, test: bool = True) -> dict:
        """Test the selected weights (unless ``test`` is False: no test example is read),
        write results.json, and return its dict."""
        cfg, p, device = self.cfg, self.progress, self.device
        self.final.load_state_dict(
            read_weights(self.out / "model.safetensors", self.out / "model.json", device)
        )
        test_acc = accuracy(self.final, self.test_loader, device, cfg.amp) if test else None
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
            f"({cfg.select}), val {selected_val:.2f}%, "
            + (f"test {test_acc:.2f}%  " if test else "test split not read  ")
            + f"train time {results['train_time_s']:.1f}s  -> {self.out}"
        )
        ddp.cleanup()
        return results
