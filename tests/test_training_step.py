"""The training step's regularisers against hand-computed values: mixup's blended loss,
label smoothing, and gradient clipping (each was once broken without a test failing).

The model is a bias-free linear map whose logits are its input (identity weights), so a
batch's loss can be written out with ``math`` alone; one batch, one step, on the CPU.
"""

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from afmp.training import epoch
from afmp.training.config import TrainConfig
from afmp.training.ema import WeightEMA

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


class LinearLogitsWithPenalty(LinearLogits):
    """LinearLogits with one auxiliary loss term, 0.5 * sum(W): its gradient is 0.5 everywhere."""

    def forward(self, x, return_aux: bool = False):
        logits = self.linear(x)
        return (logits, {"losses": {"penalty": 0.5 * self.linear.weight.sum()}}) if return_aux else logits


def run_epoch(model, batches, lr=0.0, scaler=None, ema=None, scheduler_kind="plateau", **recipe):
    """``train_one_epoch`` over literal batches with plain SGD (a step is ``-lr * grad``)."""
    cfg = TrainConfig(scheduler=scheduler_kind, amp=False, label_smoothing=0.0, **recipe)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    loader = [(torch.tensor(x), torch.tensor(y)) for x, y in batches]
    started = time.perf_counter()
    stats = epoch.train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, CPU, "test", ema=ema)
    return stats, scheduler, time.perf_counter() - started


def test_epoch_stats_are_per_example_means_over_uneven_batches():
    """Batches of 2 and 1 examples: the loss, the penalty and the input size are means over the
    3 examples (not over batches, not the last batch's); 2 of 3 argmaxes are right."""
    batches = [([[0.5, 1.5, 0.0], [2.0, 0.0, -1.0]], [2, 0]), ([[0.0, 0.0, 3.0]], [2])]
    stats, scheduler, elapsed = run_epoch(LinearLogitsWithPenalty(IDENTITY), batches)
    losses = [
        cross_entropy([0.5, 1.5, 0.0], 2),
        cross_entropy([2.0, 0.0, -1.0], 0),
        cross_entropy([0, 0, 3.0], 2),
    ]
    assert stats.loss == pytest.approx(sum(losses) / 3, abs=1e-6)
    assert stats.loss == pytest.approx(0.7430459, abs=1e-6)  # (1.96437 + 0.16982 + 0.09492) / 3
    assert stats.accuracy == pytest.approx(200 / 3)  # the first example's argmax is class 1
    assert stats.sparsity == pytest.approx(1.5)  # 0.5 * trace of the identity, every batch
    assert stats.input_size == 3.0  # elements of one example
    assert 0 < stats.first_step_s <= elapsed
    assert scheduler.last_epoch == 0  # the plateau schedule is stepped per epoch, by train()


def test_one_example_epoch_and_empty_epoch():
    stats, _, _ = run_epoch(LinearLogits(IDENTITY), [([[1.0, 0.0, 0.0]], [1])])
    assert stats.loss == pytest.approx(cross_entropy([1.0, 0.0, 0.0], 1), abs=1e-6)  # 1.5514447
    assert (stats.accuracy, stats.input_size) == (0.0, 3.0)
    assert run_epoch(LinearLogits(IDENTITY), [])[0] == (0.0, 0.0, 0.0, 0.0, 0.0)


def test_the_auxiliary_loss_is_added_to_the_task_loss_before_backward():
    """lr 0 keeps the weights, so the last gradient is CE's plus the penalty's 0.5 everywhere:
    for x = (1, 0, 0), label 0 and identity weights, (softmax(x) - onehot) x^T + 0.5."""
    model = LinearLogitsWithPenalty(IDENTITY)
    run_epoch(model, [([[1.0, 0.0, 0.0]], [0])], clip_grad=0.0)
    e = math.e
    p = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    expected = np.full((3, 3), 0.5)
    expected[:, 0] += np.array(p) - np.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(model.linear.weight.grad.numpy(), expected, atol=1e-6)


def test_the_cosine_schedule_steps_once_per_batch():
    batches = [([[1.0, 0.0, 0.0]], [0])] * 3
    _, scheduler, _ = run_epoch(LinearLogits(IDENTITY), batches, scheduler_kind="cosine")
    assert scheduler.last_epoch == 3


def test_ema_follows_each_step_and_its_state_loads():
    """The clipped step of test_gradient_clipping_scales_the_step_to_the_max_norm, with an EMA
    of decay 0.75 over zero weights: the average is 0.25 times the stepped weights."""
    model = LinearLogits([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    ema = WeightEMA(model, decay=0.75)
    run_epoch(model, [([[3.0, 4.0]], [0])], lr=1.0, ema=ema, clip_grad=1.0)
    norm = 5 * math.sqrt(6) / 3
    stepped = -np.array([[-2.0, -8 / 3], [1.0, 4 / 3], [1.0, 4 / 3]]) / norm
    np.testing.assert_allclose(ema.module.linear.weight.numpy(), 0.25 * stepped, atol=1e-6)
    fresh = WeightEMA(LinearLogits([[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]]), decay=0.5)
    fresh.load_state_dict(ema.state_dict())
    np.testing.assert_allclose(fresh.module.linear.weight.numpy(), 0.25 * stepped, atol=1e-6)


def test_a_scaled_loss_is_unscaled_before_clipping():
    """float16 training scales the loss by 2^16; the clipped step must be the unscaled one's."""
    model = LinearLogits([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    run_epoch(model, [([[3.0, 4.0]], [0])], lr=1.0, scaler=scaler, clip_grad=1.0)
    norm = 5 * math.sqrt(6) / 3
    stepped = -np.array([[-2.0, -8 / 3], [1.0, 4 / 3], [1.0, 4 / 3]]) / norm
    np.testing.assert_allclose(model.linear.weight.detach().numpy(), stepped, atol=1e-6)


def test_mixup_draws_lambda_from_beta_alpha_alpha_and_a_permutation():
    """Unpatched: with the generators seeded, λ is numpy's Beta(α, α) draw and the partners
    torch's randperm draw, the same ones drawn here directly after the same seeds."""
    np.random.seed(3)
    torch.manual_seed(3)
    inputs = torch.arange(4.0).reshape(4, 1)
    mixed, partners, lam = epoch.mixup(inputs, torch.tensor([10, 11, 12, 13]), alpha=0.4)
    np.random.seed(3)
    torch.manual_seed(3)
    want_lam, want_perm = np.random.beta(0.4, 0.4), torch.randperm(4)
    assert lam == pytest.approx(want_lam) and partners.tolist() == (want_perm + 10).tolist()
    torch.testing.assert_close(mixed, want_lam * inputs + (1 - want_lam) * inputs[want_perm])
    with pytest.raises(ValueError, match="not: use mixup_alpha=0"):
        epoch.mixup(torch.tensor([[1], [2]]), torch.tensor([0, 1]), alpha=0.4)  # integer inputs


def test_a_model_that_is_one_embedding_spares_its_table_from_decay():
    """The table's name is "weight" when the embedding is the whole model (no prefix)."""
    table = nn.Embedding(5, 3)
    decayed, spared = epoch.param_groups(table, 0.05, "weights")
    assert decayed["params"] == [] and spared["params"] == [table.weight]
