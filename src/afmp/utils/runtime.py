"""What every command that runs a model needs: a device, a seed, a precision, a memory
figure, and the threads and load a CPU timing depends on.

``afmp train``, ``evaluate``, ``compare``, ``bench`` and ``reproduce`` share these, so
they live here rather than in any one command.
"""

from __future__ import annotations

import os
import random
import resource

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU; a CUDA device without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators, from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (fp16 where bf16 is missing); full precision on the CPU or when off."""
    if device.type != "cuda" or not enabled:
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def to_device(batch, device: torch.device):
    """Move a tensor, or the tensors of a (nested) list, tuple or dict (a point-set batch), to ``device``."""
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def batch_elements(batch) -> int:
    """Elements of an input batch as fed: a tensor's, or a point-set batch's features."""
    return batch["features"].numel() if isinstance(batch, dict) else batch.numel()


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory and what it measures: CUDA allocator on GPU, process max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


# -- the machine a CPU timing depends on ---------------------------------------------------
def use_threads(threads: int) -> None:
    """torch's intra-op threads; 0 keeps its default (one per core, or OMP_NUM_THREADS)."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: torch's default), got {threads}")
    if threads:
        torch.set_num_threads(threads)


def machine_state() -> dict:
    """What a CPU timing depends on besides the code: torch's threads, the CPUs, other work."""
    return {"threads": torch.get_num_threads(), "cpus": os.cpu_count() or 1, "load_1min": os.getloadavg()[0]}


def busy_warning(machine: dict) -> str | None:
    """A warning when the load says other work shares the CPUs (timings slow down and reorder)."""
    if machine["load_1min"] <= 0.5 * machine["cpus"]:
        return None
    return (
        f"warning: the load average ({machine['load_1min']:.1f}) says other work is running on these "
        f"{machine['cpus']} CPUs; CPU timings will be slower and their ranking can change. Time one "
        "thing at a time, and compare ratios within one run (--threads or OMP_NUM_THREADS sets the threads)."
    )
