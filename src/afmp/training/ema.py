"""Exponential moving average of a model's weights (timm's "model EMA", Polyak averaging).

After every optimiser step ``p_ema <- decay * p_ema + (1 - decay) * p``; buffers are
copied. The averaged copy is what `afmp train --ema-decay` validates, tests and
saves: on a small data set it smooths out the last epochs' noise.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), e.g. 0.99; got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = list(model.parameters())
        torch._foreach_lerp_(list(self.module.parameters()), params, 1.0 - self.decay)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
