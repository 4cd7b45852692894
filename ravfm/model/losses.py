"""Loss terms: data losses on raw outputs, L2 on touched rows, Gaussian KL, distillation.

Models return raw outputs (logits for `binary`, ratings for `regression`); every loss here takes
raw outputs and reduces with a mean over the batch, so that per-batch losses are per-example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TASKS", "data_loss", "row_l2", "gaussian_kl", "distill_loss"]

TASKS = ("binary", "regression")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task={task!r} must be one of {TASKS}")


def data_loss(raw: Tensor, label: Tensor, task: str) -> Tensor:
    """Mean BCE-with-logits (binary, label 0/1) or mean squared error (regression).

    raw, label: (B,) -> ().
    """
    _check_task(task)
    label = label.to(raw.dtype)
    if task == "binary":
        return F.binary_cross_entropy_with_logits(raw, label)
    return F.mse_loss(raw, label)


def row_l2(rows: Tensor, mask: Tensor, batch_size: int) -> Tensor:
    """Sum of squares of the rows used by each example, averaged over the batch.

    Counted once per occurrence (the libFM SGD convention: a row's penalty follows its data),
    so the batch mean is an unbiased estimate of the per-example regulariser.
    rows: (B, F, D), mask: (B, F) 1 for real ids, 0 for padding -> ().
    """
    return (rows * rows).sum(dim=-1).mul(mask).sum() / batch_size


def gaussian_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """Elementwise KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))), broadcast shapes."""
    return 0.5 * (
        logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p) - 1.0
    )


def distill_loss(student: Tensor, teacher: Tensor, task: str) -> Tensor:
    """Mean divergence of the student's raw output from the (detached) teacher's.

    binary: KL(Bernoulli(sigmoid(teacher)) || Bernoulli(sigmoid(student))), i.e. BCE toward the
    teacher's probability minus its entropy (same gradient, zero at agreement);
    regression: mean squared difference. student, teacher: (B,) -> ().
    """
    _check_task(task)
    teacher = teacher.detach()
    if task == "regression":
        return F.mse_loss(student, teacher)
    p = torch.sigmoid(teacher)
    bce = F.binary_cross_entropy_with_logits(student, p)
    entropy = F.binary_cross_entropy_with_logits(teacher, p)
    return bce - entropy
