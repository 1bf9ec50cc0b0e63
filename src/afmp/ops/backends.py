"""Named backends of one op family, each able to say whether it can run, and why not.

Every fast op in afmp has a plain-PyTorch ``reference`` beside faster backends: AFMP's
edge stage (afmp.ops) and linear attention (afmp.ops.linear_attention). They share this
one shape, as NATTEN's backends do:

- a ``Backend`` holds the family's functions and two checks, ``why_not(device)`` and
  ``input_why_not(arg)`` (for the edge stage the scaffold): None when it can run
  there, else the reason in words;
- a ``BackendFamily`` is the registry of one op. ``select(name, device, arg, size)``
  returns the backend called ``name`` (an error that says why when it cannot run), or
  for ``auto`` the first entry of ``auto[(device type, compiled)]``, the family's
  measured preference list, that can run and is meant for inputs of that size.

Whether Triton runs on the CPU (``TRITON_INTERPRET=1``) is read in one place,
afmp.utils.environment; ``triton_why_not`` turns it into a reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from afmp.utils.environment import triton_interpreted


def runs_anywhere(_: Any) -> None:
    return None


def triton_why_not(device: torch.device, *, interpreted: bool | None = None) -> str | None:
    """None when Triton kernels can run on ``device``: CUDA, or the CPU under TRITON_INTERPRET=1."""
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu" and (triton_interpreted() if interpreted is None else interpreted):
        return None
    return f"the Triton kernels need a CUDA device, not {device.type} (or TRITON_INTERPRET=1 on the CPU)"


@dataclass(frozen=True, kw_only=True)
class Backend:
    name: str
    why_not: Callable[[torch.device], str | None] = runs_anywhere
    input_why_not: Callable[[Any], str | None] = runs_anywhere

    def reason(self, device: torch.device, arg: Any = None) -> str | None:
        """Why this backend cannot run on ``device`` (and ``arg``, when given); None if it can."""
        reason = self.why_not(device)
        if reason is None and arg is not None:
            reason = self.input_why_not(arg)
        return reason


class BackendFamily(dict):
    """name -> Backend for one op, and ``auto``'s preference lists.

    ``auto`` maps (device type, compiled) to [(backend name, smallest size it is taken
    for)], fastest first as measured; ``fallback`` names the backend that runs anywhere.
    """

    def __init__(
        self, op: str, auto: dict[tuple[str, bool], list[tuple[str, int]]], fallback: str = "reference"
    ):
        super().__init__()
        self.op, self.auto, self.fallback = op, auto, fallback

    def register(self, backend: Backend) -> None:
        self[backend.name] = backend

    def names(self) -> list[str]:
        return ["auto", *self]

    def select(self, name: str, device: torch.device | str, arg: Any = None, size: int = 0) -> Backend:
        """The backend called ``name``, or for ``auto`` the fastest that runs on ``device`` and ``arg``."""
        device = torch.device(device)
        if name == "auto":
            for candidate, min_size in self.auto.get((device.type, torch.compiler.is_compiling()), []):
                if size >= min_size and candidate in self and self[candidate].reason(device, arg) is None:
                    return self[candidate]
            return self[self.fallback]
        if name not in self:
            raise ValueError(f"unknown {self.op} backend {name!r}; choose one of {', '.join(self.names())}")
        reason = self[name].reason(device, arg)
        if reason is not None:
            raise RuntimeError(f"{self.op} backend {name!r} cannot run here: {reason}")
        return self[name]
