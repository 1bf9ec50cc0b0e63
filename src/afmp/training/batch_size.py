"""The largest training batch that fits a memory budget.

On CUDA, ``find_batch_size`` runs one forward and backward pass at a candidate batch
size on the largest input the data yields, reads the allocator's peak, adds the
optimizer's moments (AdamW keeps two per parameter, allocated at its first step) and
compares the sum with the budget (default 90% of the device's memory). It halves
from the requested size until a candidate fits (an out-of-memory error counts as not
fitting), then bisects between the fitting size and the failing one, to a multiple
of 8. The weights are not updated; gradients are cleared.

On the CPU nothing is probed (the process has no allocator peak to read, and the
operating system, not PyTorch, decides when memory runs out): the requested batch
size is returned, and a line says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from afmp.training.losses import auxiliary_loss
from afmp.utils.runtime import to_device


def search_batch_size(fits: Callable[[int], bool], max_batch: int, *, multiple_of: int = 8) -> int:
    """Largest b <= max_batch with ``fits(b)`` (assumed monotone); 0 if not even 1 fits.

    Halving from max_batch, then bisection between the largest fitting and smallest
    failing size, stopping at a multiple of ``multiple_of`` (when the fitting size is
    at least that). A ``torch.OutOfMemoryError`` raised by ``fits`` counts as False.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")

    def ok(b: int) -> bool:
        try:
            return bool(fits(b))
        except torch.OutOfMemoryError:
            return False

    fail, good = None, max_batch
    while good >= 1 and not ok(good):
        fail, good = good, good // 2
    if good < 1 or fail is None:
        return good
    step = multiple_of if good >= multiple_of else 1
    # Invariant: good fits, fail does not; both are multiples of step's grid around good.
    while fail - good > step:
        mid = (good + fail) // 2 // step * step
        if mid <= good:
            break
        if ok(mid):
            good = mid
        else:
            fail = mid
    return good


def training_peak_bytes(model, make_batch: Callable[[int], tuple], batch_size: int, device, autocast) -> int:
    """Peak CUDA memory of one forward + backward at ``batch_size``, plus AdamW's two moments.

    ``autocast()`` returns the context the training step runs in.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        inputs, labels = make_batch(batch_size)
        with autocast():
            logits, aux = model(inputs, return_aux=True)
            loss = F.cross_entropy(logits.float(), labels) + auxiliary_loss(aux, logits)
        loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    finally:
        model.zero_grad(set_to_none=True)
        inputs = labels = logits = aux = loss = None
        torch.cuda.empty_cache()
    moments = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return peak + moments


def find_batch_size(
    model,
    make_batch: Callable[[int], tuple],
    *,
    max_batch: int,
    device: torch.device,
    budget_mb: float = 0.0,
    autocast: Callable | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Largest batch size <= max_batch whose training step fits ``budget_mb`` (0: 90% of the GPU).

    ``autocast``: a callable returning the training step's autocast context (default none).
    """
    device = torch.device(device)
    if device.type != "cuda":
        log(f"batch size {max_batch}: as asked, not probed (memory probing needs CUDA; device is {device})")
        return max_batch
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    budget = budget_mb * 2**20 if budget_mb > 0 else 0.9 * total
    ctx = autocast or contextlib.nullcontext
    peaks: dict[int, int] = {}

    def fits(b: int) -> bool:
        peaks[b] = training_peak_bytes(model, make_batch, b, device, ctx)
        return peaks[b] <= budget

    best = search_batch_size(fits, max_batch)
    if best < 1:
        raise ValueError(f"even batch size 1 does not fit in the memory budget of {budget / 2**20:.0f} MB")
    log(
        f"batch size {best}: largest <= {max_batch} fitting {budget / 2**20:.0f} MB "
        f"(probed {sorted(peaks)}; peak {peaks[best] / 2**20:.0f} MB incl. optimizer moments)"
    )
    return best


def example_batches(model, data_args: dict, device) -> Callable[[int], tuple]:
    """``make_batch(b)``: the model's example input at the data's largest size, with random labels."""
    size = data_args.get("max_len") or data_args.get("img_size") or data_args.get("max_points")
    num_classes = max(1, int(data_args.get("num_classes", 1)))

    def make_batch(b: int):
        inputs = to_device(model.example_input(b, size), device)
        return inputs, torch.randint(0, num_classes, (b,), device=device)

    return make_batch
