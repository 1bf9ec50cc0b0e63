"""One epoch of training and what it needs: the step (mixup, label smoothing, auxiliary
losses, clipping, EMA), AdamW's parameter groups, the learning-rate schedule, accuracy, and
the counted FLOPs and measured peak that MFU divides."""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from afmp.measure import roofline
from afmp.measure.counting import count
from afmp.training import distributed as ddp
from afmp.training.checkpoint import unwrap
from afmp.training.config import TrainConfig
from afmp.training.losses import auxiliary_loss
from afmp.utils.runtime import autocast, batch_elements, to_device


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
    first_step_s: float = 0.0  # the first step's wall time (a compiled run's includes compiling)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, device, desc, ema=None) -> EpochStats:
    model.train()
    totals = {"loss": 0.0, "correct": 0, "seen": 0, "sparsity": 0.0, "elements": 0}
    started, first_step_s = time.perf_counter(), None
    for inputs, labels in tqdm(loader, desc=desc, leave=False, disable=None):
        # A new step for CUDA graphs (--compile graphs): the last step's outputs may be overwritten.
        torch.compiler.cudagraph_mark_step_begin()
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
        totals["elements"] += batch_elements(inputs)
        if first_step_s is None:
            first_step_s = time.perf_counter() - started
    totals = dict(zip(totals, ddp.all_reduce_sum(list(totals.values()), device)))  # over ranks
    seen = max(totals["seen"], 1)
    return EpochStats(
        totals["loss"] / seen,
        100.0 * totals["correct"] / seen,
        totals["sparsity"] / seen,
        totals["elements"] / seen,
        first_step_s or 0.0,
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
    dtype = (
        torch.bfloat16 if device.type == "cuda" and amp and torch.cuda.is_bf16_supported() else torch.float32
    )
    if device.type == "cuda" and amp and dtype is torch.float32:
        dtype = torch.float16
    calib = roofline.cached(device, dtype)
    return calib["peak_flops_per_s"] if calib else None
