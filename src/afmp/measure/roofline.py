"""The device's measured peak matmul rate and copy bandwidth, and the roofline they imply.

    roofline_ms = max(total_flops / peak_matmul_rate, bytes / copy_bandwidth)

A step can run no faster than that (if every flop ran at the dense-matmul rate and
every byte moved at copy speed); ``ms_median / roofline_ms`` is how far away it is.
The calibration is short (square matmuls of a few sizes, large copies; the best rate
of several tries: on a shared machine it is still a lower bound on the peak)
and cached in ``$AFMP_CACHE/roofline.json`` (default ``~/.cache/afmp``), keyed by
device, dtype, torch version and CPU thread count; ``--recalibrate`` redoes it.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from afmp.measure.timing import time_step_ms
from afmp.utils.environment import cache_dir
from afmp.utils.files import write_json

# Sizes: big enough to reach the plateau on each device, small enough to take a second.
MATMUL_SIZES = {"cuda": (4096, 8192), "cpu": (256, 512, 1024, 2048)}
COPY_BYTES = {"cuda": 2**30, "cpu": 2**26}
REPEATS = 10


def cache_path() -> Path:
    return cache_dir() / "roofline.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def calibrate(device: torch.device, dtype: torch.dtype) -> dict:
    """Measure peak matmul FLOP/s in ``dtype`` and copy bytes/s on ``device``."""
    src = torch.empty(COPY_BYTES[device.type], dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def best_ms(fn) -> float:
        fn()  # warm-up: library initialisation, clocks
        return min(time_step_ms(fn, device) for _ in range(REPEATS))

    rates = {}
    for n in MATMUL_SIZES[device.type]:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        rates[n] = 2 * n**3 / (best_ms(lambda a=a, b=b: torch.mm(a, b)) / 1e3)
    copy_ms = best_ms(lambda: dst.copy_(src))
    return {
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "peak_flops_per_s": max(rates.values()),
        "copy_bytes_per_s": 2 * src.numel() / (copy_ms / 1e3),  # each byte read once and written once
        "matmul_flops_per_s_by_n": rates,
        "copy_bytes": src.numel(),
    }


def _cache_key(device: torch.device, dtype: torch.dtype) -> str:
    return f"{device_name(device)}|{dtype}|torch {torch.__version__}"


def _read_cache() -> dict:
    try:
        cache = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def cached(device: torch.device, dtype: torch.dtype) -> dict | None:
    """The calibration for (device, dtype) if one was measured, else None (nothing is measured)."""
    return _read_cache().get(_cache_key(device, dtype))


def load_or_calibrate(device: torch.device, dtype: torch.dtype, refresh: bool = False) -> dict:
    """The cached calibration for (device, dtype), measured now if absent or ``refresh``."""
    key = _cache_key(device, dtype)
    path = cache_path()
    cache = _read_cache()
    if refresh or key not in cache:
        cache[key] = calibrate(device, dtype)
        write_json(path, cache)
    return cache[key]


def roofline_ms(total_flops: float, moved_bytes: float, calib: dict) -> float:
    return 1e3 * max(total_flops / calib["peak_flops_per_s"], moved_bytes / calib["copy_bytes_per_s"])
