"""How a run compiles its training step: ``afmp train --compile auto|off|on|graphs``.

    off     eager PyTorch
    on      torch.compile: Inductor fuses the step's elementwise passes into few kernels
            (C++ on the CPU, Triton on CUDA)
    graphs  torch.compile(mode="reduce-overhead"): on CUDA, Inductor's kernels are also
            recorded as CUDA graphs and each step's forward and backward replay as one
            launch each, which is what a launch-bound step (a small grid) needs. On the
            CPU there is nothing to record and it is ``on``.
    auto    (the default) on the CPU, by the measured crossover below; on CUDA eager, until
            a GPU run of scripts/gpu_train_modes.py has timed the modes (the same rule as the
            edge backends' CUDA_RECORD: the default is what has run on a GPU).

The optimizer step stays outside the graphs. Inside one, AdamW would need ``capturable``
state and the learning rate as a tensor that the schedule updates in place, and the
gradient clipping, EMA and mixup weights of afmp's step would all have to become static
buffers; the step's share of the time has not been measured on a GPU to say whether that
is worth it (AdamW with ``foreach`` is a few launches per parameter group).

Validation and test run the plain module, so a compiled run's last, smaller batch and its
evaluation never trigger a recompile or a new graph. A run resumed with ``--resume``
resolves ``auto`` from the same device and planned steps, so it takes the same mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("auto", "off", "on", "graphs")

# Measured on a 2-core CPU (docs/results.md, "Compiling the training step"): AFMP-Tiny's
# training step at the mnist5k shape (7x7 tokens, batch 64, AdamW, one thread) took
# CPU_EAGER_STEP_S eager (the fused gather layer) and CPU_COMPILED_STEP_S compiled (the
# stencil, which auto takes when compiled; a compiled gather step was slower than eager),
# after CPU_COMPILE_S of compiling. Compiling pays back after CPU_PAYS_AFTER_STEPS steps.
CPU_EAGER_STEP_S = 0.1276
CPU_COMPILED_STEP_S = 0.1167
CPU_COMPILE_S = 120.5
CPU_PAYS_AFTER_STEPS = round(CPU_COMPILE_S / (CPU_EAGER_STEP_S - CPU_COMPILED_STEP_S))


@dataclass(frozen=True)
class Choice:
    mode: str  # off, on or graphs
    reason: str  # why, in words: the first log line says it

    def describe(self) -> str:
        return f"compile: {self.mode} ({self.reason})"


def choose(requested: str | bool, device: torch.device, steps: int) -> Choice:
    """The mode a run of ``steps`` training steps on ``device`` takes for ``requested``.

    ``requested`` may be a bool, as config.yaml files written before the modes said it.
    """
    if isinstance(requested, bool):
        requested = "on" if requested else "off"
    if requested not in MODES:
        raise ValueError(f"compile must be one of {', '.join(MODES)}, got {requested!r}")
    if requested != "auto":
        return Choice(requested, "as asked")
    if device.type == "cuda":
        # Eager is what has run on a GPU. `graphs` is the candidate (a small-grid CUDA step is
        # launch-bound), to be taken here once scripts/gpu_train_modes.py has timed the modes.
        return Choice("off", "auto: no compile mode has been timed on a GPU yet; eager has run there")
    if steps >= CPU_PAYS_AFTER_STEPS:
        return Choice(
            "on",
            f"auto: {steps} steps on the CPU, at least the {CPU_PAYS_AFTER_STEPS} after which compiling pays",
        )
    return Choice(
        "off",
        f"auto: {steps} steps on the CPU, fewer than the {CPU_PAYS_AFTER_STEPS} after which compiling pays",
    )


def compiled(model: torch.nn.Module, choice: Choice) -> torch.nn.Module:
    """``model`` as the training steps run it under ``choice``."""
    if choice.mode == "off":
        return model
    return torch.compile(model, mode="reduce-overhead" if choice.mode == "graphs" else None)
