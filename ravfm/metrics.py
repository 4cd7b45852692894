"""Mergeable metric state: sums, counts and AUC histograms; metrics computed once, after merging.

Workers never send averages (STYLE rule 5): a `MetricState` holds sufficient statistics that
add, so the state of a whole split is the sum of its shards' states, and `to_tensor` gives a
fixed-size float64 vector that `all_reduce(SUM)` can merge.

AUC: for `binary` the state keeps two histograms (positives, negatives) of the predicted
probability sigmoid(raw) over `bins` equal-width bins of [0, 1] (default 2**20). Binning is
monotone, so pairs in different bins are ordered exactly; pairs sharing a bin count 1/2, as
ties do. The error is therefore at most `auc_error_bound` = 0.5 * sum_b pos_b neg_b / (P N),
reported by `compute()` and tested against the exact rank statistic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MetricState", "DEFAULT_BINS"]

DEFAULT_BINS = 2**20
_N, _LOGLOSS, _SQ, _ABS, _LABEL = range(5)
_NSUMS = 5


class MetricState:
    """Sufficient statistics of one split for `task` (binary | regression).

    sums: n, log-loss sum, squared-error sum, absolute-error sum, label sum (binary: the errors
    are of the probability). Binary tasks also keep the AUC histograms pos, neg: (bins,).
    """

    def __init__(
        self, task: str, bins: int | None = None, device: torch.device | str | None = None
    ) -> None:
        if task not in ("binary", "regression"):
            raise ValueError(f"task={task!r} must be binary or regression")
        self.task = task
        # Regression keeps no histograms; binary defaults to DEFAULT_BINS.
        self.bins = 0 if task == "regression" else DEFAULT_BINS if bins is None else int(bins)
        self._fixed_device = device is not None
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.sums = torch.zeros(_NSUMS, dtype=torch.float64, device=dev)
        self.pos = torch.zeros(self.bins, dtype=torch.float64, device=dev)
        self.neg = torch.zeros(self.bins, dtype=torch.float64, device=dev)

    @property
    def n(self) -> int:
        return int(self.sums[_N].item())

    def _adopt(self, device: torch.device) -> None:
        # An unpinned, still-empty state moves to where the outputs are (no host sync per step).
        if not self._fixed_device and self.sums.device != device and self.n == 0:
            self.sums, self.pos, self.neg = (t.to(device) for t in (self.sums, self.pos, self.neg))

    @torch.no_grad()
    def update(self, raw: Tensor, label: Tensor, task: str | None = None) -> None:
        """Add a batch: raw outputs (B,) (logits or ratings) and labels (B,)."""
        if task is not None and task != self.task:
            raise ValueError(f"update for task {task!r} on a {self.task} MetricState")
        self._adopt(raw.device)
        dev = self.sums.device
        raw = raw.detach().reshape(-1).to(dev, torch.float64)
        y = label.detach().reshape(-1).to(dev, torch.float64)
        if self.task == "binary":
            p = torch.sigmoid(raw)
            err = p - y
            ll = F.binary_cross_entropy_with_logits(raw, y, reduction="sum")
        else:
            err = raw - y
            ll = torch.zeros((), dtype=torch.float64, device=dev)
        add = torch.stack(
            [
                torch.tensor(float(raw.numel()), dtype=torch.float64, device=dev),
                ll,
                (err * err).sum(),
                err.abs().sum(),
                y.sum(),
            ]
        )
        self.sums += add
        if self.bins:
            idx = (p * self.bins).floor().clamp_(0, self.bins - 1).long()  # (B,) monotone in raw
            positive = y > 0.5
            self.pos.index_put_((idx[positive],), torch.ones_like(p[positive]), accumulate=True)
            self.neg.index_put_((idx[~positive],), torch.ones_like(p[~positive]), accumulate=True)

    def merge(self, other: MetricState) -> MetricState:
        """Add `other`'s statistics into this state (same task and bins); returns self."""
        if (other.task, other.bins) != (self.task, self.bins):
            raise ValueError(
                f"cannot merge {other.task}/{other.bins} bins into {self.task}/{self.bins} bins"
            )
        dev = self.sums.device
        self.sums += other.sums.to(dev)
        self.pos += other.pos.to(dev)
        self.neg += other.neg.to(dev)
        return self

    def to_tensor(self) -> Tensor:
        """The state as one float64 vector (5 + 2 * bins,) for all_reduce(SUM)."""
        return torch.cat([self.sums, self.pos, self.neg])

    @classmethod
    def from_tensor(cls, t: Tensor, task: str) -> MetricState:
        """Inverse of `to_tensor` (the bin count follows from the length)."""
        bins, rest = divmod(t.numel() - _NSUMS, 2)
        if rest or bins < 0:
            raise ValueError(f"a MetricState vector has 5 + 2*bins entries, got {t.numel()}")
        state = cls(task, bins=bins, device=t.device)
        t = t.to(torch.float64)
        state.sums.copy_(t[:_NSUMS])
        state.pos.copy_(t[_NSUMS : _NSUMS + bins])
        state.neg.copy_(t[_NSUMS + bins :])
        return state

    def compute(self) -> dict[str, float]:
        """binary: n, logloss, auc, auc_error_bound, brier, label_mean;
        regression: n, rmse, mae, label_mean. NaN where undefined (no rows, one class)."""
        s = self.sums.cpu().tolist()
        n = s[_N]
        out: dict[str, float] = {"n": int(n)}
        mean = (lambda v: v / n) if n > 0 else (lambda v: math.nan)
        if self.task == "regression":
            out.update(rmse=math.sqrt(mean(s[_SQ])), mae=mean(s[_ABS]), label_mean=mean(s[_LABEL]))
            return out
        out.update(logloss=mean(s[_LOGLOSS]), brier=mean(s[_SQ]), label_mean=mean(s[_LABEL]))
        if self.bins:
            auc, bound = _histogram_auc(self.pos.cpu(), self.neg.cpu())
            out.update(auc=auc, auc_error_bound=bound)
        return out


def _histogram_auc(pos: Tensor, neg: Tensor) -> tuple[float, float]:
    """AUC from per-bin counts (bins: (n,)), ties within a bin as 1/2; and its error bound."""
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan, math.nan
    neg_below = torch.cumsum(neg, 0) - neg  # (n,): negatives in strictly lower bins
    same = float((pos * neg).sum())
    wins = float((pos * neg_below).sum()) + 0.5 * same
    denom = n_pos * n_neg
    return wins / denom, 0.5 * same / denom
