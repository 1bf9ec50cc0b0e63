"""`afmp train`: one readable training loop for every registered model.

Settings come from TrainConfig's defaults, then a YAML file (``--config``), then
the command line; the resolved settings (model config included) are written
beside the results. The run directory gets:

    config.yaml               resolved settings
    results.json              accuracies, history, params, peak memory
    model.safetensors/.json   best-validation weights and the model's config
    last.safetensors/.json    latest weights, with last_state.pt, for --resume
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from afmp.checkpoint import atomic_write, model_spec, save_checkpoint, unwrap, write_json
from afmp.data import build_dataset
from afmp.registry import config_fields, create_model, model_entry


@dataclass
class TrainConfig:
    model: str = "afmp_tiny"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    out: str = "runs/afmp_tiny-digits"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # "cosine" (with linear warm-up) or "plateau" (the notebook's)
    warmup_epochs: float = 2.0
    clip_grad: float = 1.0  # max gradient norm; 0 turns clipping off
    amp: bool = True  # bf16/fp16 autocast on CUDA; ignored on the CPU
    device: str = "auto"
    seed: int = 0
    val_fraction: float = 0.1
    num_workers: int = 0
    model_opts: dict = field(default_factory=dict)  # Config fields of the model, e.g. sparsity
    data_opts: dict = field(default_factory=dict)  # extra loader options
    resume: bool = False  # continue from the run directory's last checkpoint


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


def train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, device, desc):
    model.train()
    totals = {"loss": 0.0, "correct": 0, "seen": 0, "sparsity": 0.0}
    for inputs, labels in tqdm(loader, desc=desc, leave=False, disable=None):
        inputs, labels = to_device(inputs, device), labels.to(device)
        with autocast(device, cfg.amp):
            logits, aux = model(inputs, return_aux=True)
            task_loss = F.cross_entropy(logits.float(), labels)
            reg = aux.get("sparsity_loss", torch.zeros((), device=device))
            loss = task_loss + reg
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if cfg.scheduler == "cosine":
            scheduler.step()
        n = labels.shape[0]
        totals["loss"] += task_loss.item() * n
        totals["sparsity"] += float(reg.detach()) * n
        totals["correct"] += (logits.argmax(-1) == labels).sum().item()
        totals["seen"] += n
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
    return 100.0 * correct / max(seen, 1)


def train(cfg: TrainConfig) -> dict:
    """Train, keep the best validation weights, report test accuracy; returns results.json's dict."""
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    data = build_dataset(
        cfg.dataset,
        data_dir=cfg.data_dir,
        download=cfg.download,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        **cfg.data_opts,
    )
    model = create_model(cfg.model, **model_args_for_data(cfg.model, data.model_args, cfg.model_opts)).to(
        device
    )
    params = sum(p.numel() for p in model.parameters())
    resolved = {**dataclasses.asdict(cfg), "resolved_model": model_spec(model)}
    atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(resolved, sort_keys=False)))

    def loader(split, shuffle, generator=None):
        return DataLoader(
            split,
            batch_size=cfg.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=cfg.num_workers,
            collate_fn=data.collate_fn,
            pin_memory=device.type == "cuda",
            drop_last=False,
        )

    val_loader, test_loader = loader(data.val, False), loader(data.test, False)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(
        device.type, enabled=device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    )
    history = {"train_loss": [], "train_acc": [], "val_acc": [], "sparsity_loss": [], "time": []}
    best_val, best_epoch, start_epoch = -1.0, -1, 0

    state_path = out / "last_state.pt"
    if cfg.resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        unwrap(model).load_state_dict(load_file(str(out / "last.safetensors"), device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, best_val, best_epoch = state["history"], state["best_val"], state["best_epoch"]
        start_epoch = state["epoch"] + 1
        print(f"resuming {out} at epoch {start_epoch + 1}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    print(
        f"{cfg.model} on {cfg.dataset}: {params / 1e6:.3f}M parameters, {len(data.train)} train / "
        f"{len(data.val)} val / {len(data.test)} test, device {device}"
    )
    for epoch in range(start_epoch, cfg.epochs):
        # Re-seeding per epoch makes a resumed run draw the same batches as an unbroken one.
        seed_everything(cfg.seed * 100_003 + epoch)
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        started = time.perf_counter()
        loss, acc, sparsity = train_one_epoch(
            model,
            loader(data.train, True, generator),
            optimizer,
            scheduler,
            scaler,
            cfg,
            device,
            f"epoch {epoch + 1}/{cfg.epochs}",
        )
        val_acc = evaluate(model, val_loader, device, cfg.amp)
        if cfg.scheduler == "plateau":
            scheduler.step(val_acc)
        for key, value in zip(history, (loss, acc, val_acc, sparsity, time.perf_counter() - started)):
            history[key].append(value)
        print(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f}  train {acc:.2f}%  val {val_acc:.2f}%  "
            f"sparsity-loss {sparsity:.2e}  {history['time'][-1]:.1f}s"
        )
        if val_acc > best_val:
            best_val, best_epoch = val_acc, epoch
            save_checkpoint(model, out, "model", epoch=epoch, val_accuracy=val_acc)
        save_checkpoint(model, out, "last", epoch=epoch)
        state = {
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "history": history,
            "best_val": best_val,
            "best_epoch": best_epoch,
        }
        atomic_write(state_path, lambda tmp, s=state: torch.save(s, tmp))

    if best_epoch >= 0:
        unwrap(model).load_state_dict(load_file(str(out / "model.safetensors"), device=str(device)))
    test_acc = evaluate(model, test_loader, device, cfg.amp)
    peak, peak_source = peak_memory_mb(device)
    results = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "config": resolved,
        "params": params,
        "best_val_accuracy": best_val,
        "best_epoch": best_epoch + 1,
        "test_accuracy": test_acc,
        "peak_memory_mb": peak,
        "peak_memory_source": peak_source,
        "device": str(device),
        "train_time_s": sum(history["time"]),
        "training_history": history,
    }
    write_json(out / "results.json", results)
    print(
        f"best val {best_val:.2f}% (epoch {best_epoch + 1})  test {test_acc:.2f}%  "
        f"train time {results['train_time_s']:.1f}s  -> {out}"
    )
    return results


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
    p.add_argument("--config", help="YAML file of TrainConfig fields (command-line flags override it)")
    p.add_argument("--model", help="registered model name (afmp models lists them)")
    p.add_argument("--dataset", help="data set name")
    p.add_argument("--data-dir", help="where the data set's files are")
    p.add_argument("--download", action="store_true", default=None, help="download the data set if missing")
    p.add_argument("--out", help="run directory")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--scheduler", choices=["cosine", "plateau"])
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--clip-grad", type=float, help="max gradient norm (0: off)")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="no autocast on CUDA")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int)
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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
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
    train(config_from_args(args))
    return 0
