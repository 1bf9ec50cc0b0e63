"""`afmp train`: one readable training loop for every registered model.

Settings come from TrainConfig's defaults, then a YAML file (``--config``), then
the command line; the resolved settings (model config included) are written
beside the results. The run directory gets:

    config.yaml               resolved settings
    results.json              accuracies, history, params, peak memory (strict JSON)
    model.safetensors/.json   the tested weights (see SELECT) and the model's config
    last.safetensors/.json    latest weights
    checkpoints/epoch-N/      the same four files and state.pt (optimizer, schedule,
                              history), committed whole with checksums: what --resume reads
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
import csv
import dataclasses
import math
import random
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from afmp import batch_size as batch_sizing
from afmp import distributed as ddp
from afmp import rundir
from afmp.checkpoint import (
    atomic_write,
    model_spec,
    read_weights,
    save_checkpoint,
    saved_config,
    unwrap,
    write_json,
)
from afmp.data import DataBundle, build_dataset
from afmp.ema import WeightEMA
from afmp.errors import UsageError, usage_errors
from afmp.losses import auxiliary_loss
from afmp.registry import config_fields, create_model, model_entry


@dataclass
class TrainConfig:
    model: str = "afmp_tiny"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    out: str = "runs/afmp_tiny-digits"
    # The default job's recipe (digits) was chosen by mean validation accuracy over five
    # seeds among the recipes in docs/results.md; weight decay 0.05 and label smoothing 0.1
    # are also DeiT's.
    epochs: int = 80
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    # "all": AdamW decays every parameter (the notebook's and our recipes so far); "weights":
    # only the layers' weight matrices and kernels, not norms, biases or embeddings (timm's habit).
    weight_decay_on: str = "all"
    scheduler: str = "cosine"  # "cosine" (with linear warm-up) or "plateau" (the notebook's)
    warmup_epochs: float = 2.0
    clip_grad: float = 1.0  # max gradient norm; 0 turns clipping off
    label_smoothing: float = 0.1  # cross-entropy target smoothing, in [0, 1)
    mixup_alpha: float = 0.0  # mixup's Beta(alpha, alpha) blend of image batches; 0 = off
    ema_decay: float = 0.0  # weight EMA (afmp.ema): validated, tested and saved instead; 0 = off
    select: str = "last"  # weights tested and saved as model.*: "last" epoch's or "best_val" epoch's
    amp: bool = True  # bf16/fp16 autocast on CUDA; ignored on the CPU
    compile: bool = False  # torch.compile the training step's model (first steps are slow: compiling)
    device: str = "auto"
    seed: int = 0
    val_fraction: float = 0.1
    num_workers: int = 0
    model_opts: dict = field(default_factory=dict)  # Config fields of the model, e.g. sparsity
    data_opts: dict = field(default_factory=dict)  # extra loader options
    resume: bool = False  # continue from the run directory's last checkpoint
    tensorboard: bool = False  # also log to TensorBoard under out/tb
    viz_every: int = 0  # draw gates and sparsity (afmp.viz) every k epochs; 0 = off
    auto_batch: bool = False  # CUDA: largest batch <= batch_size fitting memory_budget_mb (batch_size.py)
    memory_budget_mb: float = 0.0  # for auto_batch; 0 = 90% of the GPU's memory


# Which weights the run tests and saves as model.*. "last": the end of the schedule (the
# cosine schedule decays to 0, so the last epoch is its intended result). "best_val": the
# epoch of highest validation accuracy, ties to the later epoch; on a small validation
# split (180 images on digits, a standard error of about 1.6 points) that choice is mostly
# noise and leans to earlier epochs trained at a higher learning rate.
SELECT = ("last", "best_val")


# -- checking the settings ----------------------------------------------------------------
def _integer(low: int):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer >= {low}"


def _number(low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False):
    def ok(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    if high == math.inf:
        return ok, f"a number {'>' if open_low else '>='} {low:g}"
    return ok, f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"


def _kind(kind: type, name: str):
    return (lambda v: isinstance(v, kind)), name


_FLAG = _kind(bool, "true or false")
_TEXT = _kind(str, "a string")
# Field -> (test, what it expects). Every field of TrainConfig is here (a test checks it).
CHECKS = {
    "model": _TEXT,
    "dataset": _TEXT,
    "data_dir": ((lambda v: v is None or isinstance(v, str)), "a path"),
    "download": _FLAG,
    "out": ((lambda v: isinstance(v, str) and v != ""), "a directory path"),
    "epochs": _integer(1),
    "batch_size": _integer(1),
    "lr": _number(0),  # 0 freezes the weights (a test uses it)
    "weight_decay": _number(0),
    "weight_decay_on": ((lambda v: v in ("all", "weights")), "all or weights"),
    "scheduler": ((lambda v: v in ("cosine", "plateau")), "cosine or plateau"),
    "warmup_epochs": _number(0),
    "clip_grad": _number(0),
    "label_smoothing": _number(0, 1, open_high=True),
    "mixup_alpha": _number(0),
    "ema_decay": _number(0, 1, open_high=True),
    "select": ((lambda v: v in SELECT), " or ".join(SELECT)),
    "amp": _FLAG,
    "compile": _FLAG,
    "device": _TEXT,
    "seed": _integer(0),
    "val_fraction": _number(0, 1, open_low=True, open_high=True),
    "num_workers": _integer(0),
    "model_opts": _kind(dict, "a mapping of model options"),
    "data_opts": _kind(dict, "a mapping of data options"),
    "resume": _FLAG,
    "tensorboard": _FLAG,
    "viz_every": _integer(0),
    "auto_batch": _FLAG,
    "memory_budget_mb": _number(0),
}


def check_config(cfg: TrainConfig) -> None:
    """Every setting in range, and the run directory writable, before anything runs."""
    for name, (ok, expected) in CHECKS.items():
        value = getattr(cfg, name)
        if not ok(value):
            flag = f" (--{name.replace('_', '-')})" if "_" in name else ""
            raise UsageError(f"{name}{flag} must be {expected}, got {value!r}")
    model_cls, _ = model_entry(cfg.model)  # a ValueError naming the registered models
    unknown = sorted(set(cfg.model_opts) - set(config_fields(model_cls)))
    if unknown:
        raise UsageError(
            f"unknown option(s) {', '.join(unknown)} for model {cfg.model!r}; "
            f"valid: {', '.join(config_fields(model_cls))}"
        )
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; expected a directory (or a path to create one)")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    try:  # a file that is gone when closed: the one sure test (permissions lie to root)
        if not existing.is_dir():
            raise NotADirectoryError(existing)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write in {existing} ({err.strerror or err})") from err


# -- set-up -------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def model_args_for_data(name: str, data_args: dict, user_opts: dict) -> dict:
    """Config overrides that fit model ``name`` to the data; the user's own options win.

    For an image model whose preset was made for another resolution, the patch size
    is scaled to keep the preset's token grid (AFMP-Tiny: 32/8 on CIFAR, 8/2 on digits).
    """
    model_cls, preset = model_entry(name)
    fields = config_fields(model_cls)
    args = {k: v for k, v in data_args.items() if k in fields}
    img = args.get("img_size")
    if img and "patch_size" in fields and "patch_size" not in user_opts and "img_size" not in user_opts:
        grid = preset.get("img_size", img) // preset.get("patch_size", 1)
        divisors = [p for p in range(1, img + 1) if img % p == 0]
        args["patch_size"] = min(divisors, key=lambda p: (abs(img // p - grid), p))
    return {**args, **user_opts}


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


def autocast(device: torch.device, enabled: bool):
    if device.type != "cuda" or not enabled:
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory and what it measures: CUDA allocator on GPU, process max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


# -- the loop -----------------------------------------------------------------------------
def to_device(batch, device):
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


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


def train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, device, desc, ema=None):
    model.train()
    totals = {"loss": 0.0, "correct": 0, "seen": 0, "sparsity": 0.0}
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
    totals = dict(zip(totals, ddp.all_reduce_sum(list(totals.values()), device)))  # over ranks
    seen = max(totals["seen"], 1)
    return totals["loss"] / seen, 100.0 * totals["correct"] / seen, totals["sparsity"] / seen


@torch.no_grad()
def evaluate(model, loader, device, amp: bool = True) -> float:
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


def train(cfg: TrainConfig) -> dict:
    """Train, save and test the selected weights (SELECT); returns results.json's dict."""
    with usage_errors():
        setup = prepare(cfg)
    lock = rundir.RunLock(cfg.out) if setup.env.is_main else contextlib.nullcontext()
    with lock:
        return _run(setup)


def _run(setup: Setup) -> dict:
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
    flops_per_image = flops_per_train_image(
        model, batch_sizing.example_batches(model, data.model_args, device)
    )
    peak = cached_peak_flops(device, cfg.amp)
    model = ddp.wrap(model, env, device)
    if cfg.compile:  # the training steps only; validation and test run the plain module
        model = torch.compile(model)
    # What is validated, tested and saved as model.safetensors: the average when there is one.
    final = ema.module if ema is not None else unwrap(model)
    params = sum(p.numel() for p in model.parameters())
    resolved = {**dataclasses.asdict(cfg), "resolved_model": model_spec(model)}
    if env.is_main:
        atomic_write(
            out / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        )

    def loader(split, sampler):
        return DataLoader(
            split,
            batch_size=ddp.local_batch_size(cfg.batch_size, env),
            sampler=sampler,
            num_workers=cfg.num_workers,
            collate_fn=data.collate_fn,
            pin_memory=device.type == "cuda",
            drop_last=False,
        )

    val_loader = loader(data.val, ddp.ShardSampler(data.val, env))
    test_loader = loader(data.test, ddp.ShardSampler(data.test, env))
    train_sampler = ddp.train_sampler(data.train, env, seed=cfg.seed * 100_003)
    steps_per_epoch = math.ceil(len(train_sampler) / ddp.local_batch_size(cfg.batch_size, env))
    optimizer = torch.optim.AdamW(
        param_groups(unwrap(model), cfg.weight_decay, cfg.weight_decay_on), lr=cfg.lr
    )
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(
        device.type, enabled=device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    )
    history = {
        "train_loss": [], "train_acc": [], "val_acc": [], "sparsity_loss": [], "time": [],
        "images_per_s": [], "mfu": [],
    }  # fmt: skip
    best_val, best_epoch, start_epoch = -1.0, -1, 0
    selected_epoch = -1

    committed = setup.resume_from  # the newest committed checkpoint folder
    if committed is not None:
        state = torch.load(committed / "state.pt", map_location=device, weights_only=True)
        unwrap(model).load_state_dict(
            read_weights(committed / "last.safetensors", committed / "last.json", device)
        )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, best_val, best_epoch = state["history"], state["best_val"], state["best_epoch"]
        for key in ("images_per_s", "mfu"):  # a run saved before these were recorded
            history.setdefault(key, [None] * len(history["val_acc"]))
        selected_epoch = state["selected_epoch"]
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch = state["epoch"] + 1
        if env.is_main:
            publish(committed, out)  # a crash may have stopped the previous publish half-way
        log(f"resuming {out} at epoch {start_epoch + 1}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    tb = None
    if cfg.tensorboard and env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tb"))
    log(
        f"{cfg.model} on {cfg.dataset}: {params / 1e6:.3f}M parameters, {len(data.train)} train / "
        f"{len(data.val)} val / {len(data.test)} test, device {device}, {env.world_size} process(es)"
    )
    for epoch in range(start_epoch, cfg.epochs):
        # Re-seeding per epoch makes a resumed run draw the same batches as an unbroken one;
        # the sampler's permutation is shared by all ranks, their augmentation seeds are not.
        seed_everything(cfg.seed * 100_003 + epoch + 1_000_003 * env.rank)
        train_sampler.set_epoch(epoch)
        started = time.perf_counter()
        loss, acc, sparsity = train_one_epoch(
            model,
            loader(data.train, train_sampler),
            optimizer,
            scheduler,
            scaler,
            cfg,
            device,
            f"epoch {epoch + 1}/{cfg.epochs}",
            ema,
        )
        images_per_s = len(train_sampler) * env.world_size / (time.perf_counter() - started)
        mfu = flops_per_image * images_per_s / peak if peak else None
        val_acc = evaluate(final, val_loader, device, cfg.amp)
        if cfg.scheduler == "plateau":
            scheduler.step(val_acc)
        values = (loss, acc, val_acc, sparsity, time.perf_counter() - started, images_per_s, mfu)
        for key, value in zip(history, values, strict=True):
            history[key].append(value)
        log(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f}  train {acc:.2f}%  val {val_acc:.2f}%  "
            f"sparsity-loss {sparsity:.2e}  {history['time'][-1]:.1f}s  {images_per_s:.0f} img/s"
            + (f"  MFU {100 * mfu:.2f}%" if mfu is not None else "")
        )
        improved = val_acc >= best_val  # ties: the later epoch (see SELECT)
        if improved:
            best_val, best_epoch = val_acc, epoch
        selected = improved if cfg.select == "best_val" else True
        if selected:
            selected_epoch = epoch
        if env.is_main:
            state = {
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "history": history,
                "best_val": best_val,
                "best_epoch": best_epoch,
                "selected_epoch": selected_epoch,
                **({"ema": ema.state_dict()} if ema is not None else {}),
            }

            def fill(
                folder: Path, epoch=epoch, val_acc=val_acc, selected=selected, state=state, previous=committed
            ):
                if selected:
                    save_checkpoint(final, folder, "model", epoch=epoch, val_accuracy=val_acc)
                else:  # the selected weights stay those of an earlier epoch
                    for name in ("model.safetensors", "model.json"):
                        shutil.copyfile(previous / name, folder / name)
                save_checkpoint(model, folder, "last", epoch=epoch)
                torch.save(state, folder / "state.pt")

            committed = rundir.commit_checkpoint(out, epoch, fill)
            publish(committed, out)
            log_epoch(out, history, tb, lr=optimizer.param_groups[0]["lr"])
            if cfg.viz_every and ((epoch + 1) % cfg.viz_every == 0 or epoch + 1 == cfg.epochs):
                from afmp import viz

                viz.epoch_hook(final, data, out, epoch + 1)
        ddp.barrier()  # the other ranks read these files at the end (and on --resume)

    selected_val = history["val_acc"][selected_epoch]
    final.load_state_dict(read_weights(out / "model.safetensors", out / "model.json", device))
    test_acc = evaluate(final, test_loader, device, cfg.amp)
    peak, peak_source = peak_memory_mb(device)
    results = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "config": resolved,
        "params": params,
        "best_val_accuracy": best_val,
        "best_epoch": best_epoch + 1,
        "selected": cfg.select,
        "selected_epoch": selected_epoch + 1,
        "val_accuracy": selected_val,  # of the tested weights
        "test_accuracy": test_acc,
        "peak_memory_mb": peak,
        "peak_memory_source": peak_source,
        "device": str(device),
        "train_time_s": sum(history["time"]),
        "data": data.info,  # where the data came from, when the loader says (e.g. its file)
        "training_history": history,
    }
    if env.is_main:
        write_json(out / "results.json", results)
    if tb is not None:
        tb.close()
    log(
        f"best val {best_val:.2f}% (epoch {best_epoch + 1})  tested: epoch {selected_epoch + 1} "
        f"({cfg.select}), val {selected_val:.2f}%, test {test_acc:.2f}%  "
        f"train time {results['train_time_s']:.1f}s  -> {out}"
    )
    ddp.cleanup()
    return results


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

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", *history])
            w.writerows([i + 1, *row] for i, row in enumerate(zip(*history.values())))

    atomic_write(out / "history.csv", write)
    if tb is not None:
        epoch = len(history["val_acc"])
        for key, values in history.items():
            if values[-1] is not None:
                tb.add_scalar(key, values[-1], epoch)
        tb.add_scalar("lr", lr, epoch)


# -- command line -------------------------------------------------------------------------
def parse_key_values(pairs: list[str] | None) -> dict:
    """``["sparsity=0.5", "use_top_down=false"]`` -> {"sparsity": 0.5, "use_top_down": False} (YAML values)."""
    opts = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        opts[key.strip()] = yaml.safe_load(value)
    return opts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="YAML file of TrainConfig fields, or the name of one shipped with afmp (afmp_tiny_digits); flags override it",
    )
    p.add_argument("--model", help="registered model name (afmp models lists them)")
    p.add_argument("--dataset", help="data set name")
    p.add_argument("--data-dir", help="where the data set's files are")
    p.add_argument("--download", action="store_true", default=None, help="download the data set if missing")
    p.add_argument("--out", help="run directory")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument(
        "--weight-decay-on",
        choices=["all", "weights"],
        help="all parameters (default) or only layer weights: not norms, biases, embeddings",
    )
    p.add_argument("--scheduler", choices=["cosine", "plateau"])
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--clip-grad", type=float, help="max gradient norm (0: off)")
    p.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing in [0, 1)")
    p.add_argument("--mixup-alpha", type=float, help="mixup Beta(alpha, alpha) on image batches (0: off)")
    p.add_argument(
        "--ema-decay", type=float, help="keep an EMA of the weights (e.g. 0.99) and evaluate it (0: off)"
    )
    p.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="no autocast on CUDA")
    p.add_argument(
        "--compile", action="store_true", default=None, help="torch.compile the model for the training steps"
    )
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--select", choices=SELECT, help="weights to test and save: last epoch (default) or best validation"
    )
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--num-workers", type=int)
    p.add_argument(
        "-o",
        "--model-opt",
        action="append",
        metavar="KEY=VALUE",
        help="model config field, e.g. -o sparsity=0.5 -o use_top_down=false (repeatable)",
    )
    p.add_argument("--data-opt", action="append", metavar="KEY=VALUE", help="data loader option (repeatable)")
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue from the run directory's last checkpoint",
    )
    p.add_argument(
        "--tensorboard", action="store_true", default=None, help="also log to TensorBoard (out/tb)"
    )
    p.add_argument(
        "--viz-every", type=int, metavar="K", help="draw gates and sparsity every K epochs (0: off)"
    )
    p.add_argument(
        "--auto-batch",
        action="store_true",
        default=None,
        help="on CUDA, lower --batch-size to the largest that fits --memory-budget-mb (the CPU keeps it)",
    )
    p.add_argument("--memory-budget-mb", type=float, help="for --auto-batch (default: 90%% of the GPU)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if args.config:
        path = Path(args.config)
        shipped = Path(__file__).parent / "configs" / f"{args.config}.yaml"
        if not path.is_file() and shipped.is_file():  # a config shipped with afmp, by name
            path = shipped
        if not path.is_file():
            names = ", ".join(p.stem for p in sorted(shipped.parent.glob("*.yaml")))
            raise UsageError(f"--config {args.config}: no such file, and not a shipped config ({names})")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UsageError(f"{args.config} is not valid YAML ({err})") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of TrainConfig fields")
        values.update(loaded)
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in valid - {"model_opts", "data_opts"}:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    values["model_opts"] = {**values.get("model_opts", {}), **parse_key_values(args.model_opt)}
    values["data_opts"] = {**values.get("data_opts", {}), **parse_key_values(args.data_opt)}
    values.pop("resolved_model", None)  # present when a run's own config.yaml is passed back in
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    if "out" not in values:
        values["out"] = (
            f"runs/{values.get('model', TrainConfig.model)}-{values.get('dataset', TrainConfig.dataset)}"
        )
    return TrainConfig(**values)


def main(args: argparse.Namespace) -> int:
    with usage_errors():
        cfg = config_from_args(args)
    train(cfg)
    return 0


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m afmp.train ... (same flags as afmp train)
    import sys

    from afmp_cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
