"""The training step's regularisers against hand-computed values: mixup's blended loss,
label smoothing, and gradient clipping (each was once broken without a test failing).

The model is a bias-free linear map whose logits are its input (identity weights), so a
batch's loss can be written out with ``math`` alone; one batch, one step, on the CPU.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from afmp.training import epoch
from afmp.training.config import TrainConfig

CPU = torch.device("cpu")


class LinearLogits(nn.Module):
    """logits = x W^T; the training step's model contract (``return_aux``) with no aux losses."""

    def __init__(self, weight: list[list[float]]):
        super().__init__()
        self.linear = nn.Linear(len(weight[0]), len(weight), bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(weight))

    def forward(self, x, return_aux: bool = False):
        logits = self.linear(x)
        return (logits, {}) if return_aux else logits


def one_step(model, inputs, labels, lr: float = 0.0, **recipe):
    """One batch through ``train_one_epoch`` (plain SGD, so a step is ``-lr * grad``)."""
    cfg = TrainConfig(scheduler="plateau", amp=False, **recipe)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = [(torch.tensor(inputs), torch.tensor(labels))]
    return epoch.train_one_epoch(model, loader, optimizer, None, scaler, cfg, CPU, "test")


def cross_entropy(logits: list[float], label: int, smoothing: float = 0.0) -> float:
    """Smoothed cross-entropy by hand: (1 - eps) * -log p[label] + eps * mean_k -log p[k]."""
    log_z = math.log(sum(math.exp(z) for z in logits))
    nll = [log_z - z for z in logits]
    return (1 - smoothing) * nll[label] + smoothing * sum(nll) / len(nll)


IDENTITY = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_label_smoothing_is_in_the_task_loss():
    inputs, labels = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], [0, 2]
    stats = one_step(LinearLogits(IDENTITY), inputs, labels, label_smoothing=0.1)
    expected = (cross_entropy(inputs[0], 0, 0.1) + cross_entropy(inputs[1], 2, 0.1)) / 2
    assert stats.loss == pytest.approx(expected, abs=1e-6)
    # the literal value, and how far it is from the unsmoothed loss a mutant would report
    assert stats.loss == pytest.approx(1.1171074, abs=1e-6)
    assert (cross_entropy(inputs[0], 0) + cross_entropy(inputs[1], 2)) / 2 == pytest.approx(
        1.0671074, abs=1e-6
    )


def test_mixup_loss_weighs_the_shuffled_labels_by_one_minus_lambda(monkeypatch):
    """λ = 0.75 and the permutation (1, 0) fixed: each mixed image's loss is
    λ CE(mixed, own label) + (1 - λ) CE(mixed, the partner's label), both smoothed."""
    monkeypatch.setattr(epoch.np.random, "beta", lambda a, b: 0.75)
    monkeypatch.setattr(epoch.torch, "randperm", lambda n, device=None: torch.tensor([1, 0]))
    inputs, labels = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], [0, 1]
    stats = one_step(LinearLogits(IDENTITY), inputs, labels, mixup_alpha=0.2, label_smoothing=0.1)
    mixed = [[0.75, 0.5, 0.0], [0.25, 1.5, 0.0]]  # 0.75 * x + 0.25 * x[(1, 0)]
    partner = [1, 0]
    expected = sum(
        0.75 * cross_entropy(mixed[i], labels[i], 0.1) + 0.25 * cross_entropy(mixed[i], partner[i], 0.1)
        for i in range(2)
    )
    assert stats.loss == pytest.approx(expected / 2, abs=1e-6)
    assert stats.loss == pytest.approx(0.8429084, abs=1e-6)


def test_mixup_blends_inputs_and_returns_the_partners_labels(monkeypatch):
    monkeypatch.setattr(epoch.np.random, "beta", lambda a, b: 0.25)
    monkeypatch.setattr(epoch.torch, "randperm", lambda n, device=None: torch.tensor([2, 0, 1]))
    inputs = torch.tensor([[4.0], [8.0], [0.0]])
    mixed, partner_labels, lam = epoch.mixup(inputs, torch.tensor([5, 6, 7]), alpha=1.0)
    assert lam == 0.25
    assert mixed.flatten().tolist() == [1.0, 5.0, 6.0]  # 0.25 * x + 0.75 * x[(2, 0, 1)]
    assert partner_labels.tolist() == [7, 5, 6]
    with pytest.raises(ValueError, match="mixup_alpha must be >= 0"):
        epoch.mixup(inputs, torch.tensor([5, 6, 7]), alpha=-1.0)


def test_gradient_clipping_scales_the_step_to_the_max_norm():
    """Zero weights, x = (3, 4), label 0: the gradient is (softmax - onehot) x^T =
    (-2/3, 1/3, 1/3) x^T, of norm 5 sqrt(6) / 3 ~ 4.08; clipped to norm 1 and stepped with
    SGD at lr 1, the weights become minus the gradient over its norm."""
    model = LinearLogits([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    one_step(model, [[3.0, 4.0]], [0], lr=1.0, clip_grad=1.0, label_smoothing=0.0)
    grad = model.linear.weight.grad
    assert float(grad.norm()) == pytest.approx(1.0, abs=1e-5)
    norm = 5 * math.sqrt(6) / 3
    expected = -np.array([[-2 / 3 * 3, -2 / 3 * 4], [3 / 3, 4 / 3], [3 / 3, 4 / 3]]) / norm
    np.testing.assert_allclose(model.linear.weight.detach().numpy(), expected, atol=1e-6)


def test_clip_grad_zero_leaves_the_gradient_whole():
    model = LinearLogits([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    one_step(model, [[3.0, 4.0]], [0], lr=1.0, clip_grad=0.0, label_smoothing=0.0)
    assert float(model.linear.weight.grad.norm()) == pytest.approx(5 * math.sqrt(6) / 3, abs=1e-5)
