"""Timing one step, peak memory, and telling out-of-memory apart from other failures.

GPU: CUDA events around the step, after a synchronize, so each step is timed alone
(launch overhead included, as a user's latency would). CPU: ``time.perf_counter``.

Peak memory says what it measures (``peak_source``):
- ``cuda_max_allocated``: the CUDA caching allocator's peak during the step, minus
  what was allocated before the model was built (other models' weights), so it is
  this model's weights, gradients, input and activations;
- ``rss_hwm_delta`` (CPU): the process's resident-set high-water mark during the
  step (reset through /proc/self/clear_refs) minus its RSS when the step starts,
  after returning freed heap to the OS (malloc_trim): the step's activations and
  gradients, not the weights already resident. An estimate: the allocator may reuse
  memory the process still holds. ``unavailable`` (NaN) where /proc does not allow it.

CPU timings are steadier with ``keep_freed_memory``: glibc's malloc then keeps freed
blocks for reuse instead of unmapping them, as PyTorch's CUDA allocator keeps them.
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step_ms(step: Callable[[], object], device: torch.device) -> float:
    """Wall time of one ``step()`` in milliseconds, the device idle before it starts."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def is_oom(err: BaseException) -> bool:
    """True for an out-of-memory error on any device (CUDA's, or the CPU allocator's)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def memory_in_use(device: torch.device) -> float:
    """Bytes held for tensors now: the CUDA allocator's count, or the process RSS."""
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated(device))
    return _proc_status_kb("VmRSS") * 1024


def peak_step_mb(step: Callable[[], object], device: torch.device, baseline: float) -> tuple[float, str]:
    """(peak memory of one ``step()`` above ``baseline`` bytes, in MiB; what it measures)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20, "cuda_max_allocated"
    _malloc_trim()
    if not _reset_high_water_mark():
        step()
        return math.nan, "unavailable"
    before = _proc_status_kb("VmRSS")
    step()
    return (_proc_status_kb("VmHWM") - before) / 1024, "rss_hwm_delta"


def _proc_status_kb(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return math.nan


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only once 2 GiB lie free at the heap's top


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next step: no large block is mapped from
    the OS on its own (M_MMAP_MAX 0), and the heap's free top is not handed back
    (M_TRIM_THRESHOLD). By default a step that frees and again allocates blocks of tens
    of MB gets them mapped afresh each time and pays their page faults: on a 2-core CPU
    AFMP-Tiny's batch-64 inference at the mnist5k shape took 33-49 ms by default and 24-27 ms
    with this, and its run-to-run spread went with it (docs/results.md). The same as
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``, set from
    inside the process. Returns False, changing nothing, where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
