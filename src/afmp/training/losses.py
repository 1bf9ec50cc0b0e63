"""The loss contract between models and everything that trains them.

A model's ``forward(x, return_aux=True)`` returns ``(logits, aux)``; ``aux["losses"]``, when
present, holds the model's own loss terms by name, each already weighted (AFMP:
``{"sparsity": lambda_sparse * mean gate}``). Training, the bench's train step and batch
sizing all add ``auxiliary_loss(aux)`` to the task loss, so a new term needs no change there.
"""

from __future__ import annotations

import torch


def auxiliary_loss(aux: dict, like: torch.Tensor) -> torch.Tensor:
    """The sum of ``aux["losses"]`` (a zero on ``like``'s device when the model has none)."""
    total = torch.zeros((), device=like.device)
    for term in aux.get("losses", {}).values():
        total = total + term
    return total
