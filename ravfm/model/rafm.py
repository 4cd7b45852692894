"""Rank-Aware FM (Chen, Zheng, Wang, Ma, Huang, ICML 2019): rank grows with feature frequency.

Levels 0..m-1 have ranks k_0 < ... < k_{m-1}; a feature's level is the number of count
thresholds it exceeds in train (`rafm_levels`). Level l has its own table "rafm_l" holding only
the features at level >= l, compacted: row 0 is a shared never-used row (padding and every
feature below the level map to it, always with weight 0) and `remap_l` (N,) gives the others
their compact ids 1..n_l. Table 0 holds every feature and, in column 0, its linear weight.

A pair (i, j) interacts through its level min(l_i, l_j). With u^l_p = x_p v^l_p and
P_l(S) = sum over pairs in S of <u^l_p, u^l_q>, the telescoping form is
    y = w0 + sum_p x_p w_p + sum_l [P_l(level >= l) - P_l(level > l)]
(the top level has nothing above it), each P by the square-of-sum identity, O(F sum_l k_l)
per example with dense masks (no host sync; RaFM's saving is parameters, not FLOPs).

Training (as in the authors' code): the data loss of the full model trains every parameter.
For each l < m-1 a distillation term pulls the truncated model B_l (pairs with both features at
level >= l use level l, lower pairs their own level) toward B_{l+1} (detached). Choices where
the reference is loose: (1) in that term only level l's dependent factors (features above l)
take gradients: their free factors, the lower-level part, the bias and the linear weights are
detached, since distillation is about the truncated interaction; (2) L2 (model.l2_*) is on the
rows a batch uses, once per occurrence, like FM, not on whole tables.
RaFM-low, `predict(..., low=True)`, is the FM of level-0 factors alone (one gather).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn

from ravfm.batch import PAD_ID, Batch
from ravfm.errors import UserError
from ravfm.model.fm import fm_init
from ravfm.model.layers import (
    TableFactory,
    clip_output,
    count_params,
    output_range_buffer,
    pairwise,
    plain_tables,
)
from ravfm.model.losses import data_loss, distill_loss, row_l2

__all__ = ["RaFM", "rafm_levels"]


def rafm_levels(counts: np.ndarray | Tensor, thresholds: Sequence[int]) -> Tensor:
    """Level of each row: how many thresholds its train count exceeds. (N,) -> LongTensor (N,).

    Row 0 (padding) is level 0 whatever its count.
    """
    t = torch.as_tensor(list(thresholds), dtype=torch.int64)
    if bool((t[1:] < t[:-1]).any()):
        raise UserError(f"model.rafm.thresholds={t.tolist()} must be non-decreasing, "
                        "one count per level above the first")  # fmt: skip
    c = torch.as_tensor(np.asarray(counts), dtype=torch.int64)
    levels = torch.searchsorted(t, c, right=False)  # number of thresholds < count
    if levels.numel():
        levels[0] = 0
    return levels


def _masked_sums(u: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """u (B, F, K), mask (B, F) -> S = sum_p mask u_p (B, K), Q = sum_p mask |u_p|^2 (B,)."""
    um = u * mask.unsqueeze(-1)
    return um.sum(1), (um * u).sum((1, 2))


def _half_sq(s: Tensor) -> Tensor:
    """0.5 |s|^2 over the last dim: (B, K) -> (B,)."""
    return 0.5 * (s * s).sum(-1)


def _normal_init(w: Tensor, std: float) -> None:
    w.normal_(0.0, std)


class RaFM(nn.Module):
    """RaFM over `levels` (N,) with ranks `ranks` (m,); see the module docstring."""

    def __init__(
        self,
        num_rows: int,
        ranks: Sequence[int],
        levels: Tensor,
        *,
        make_table: TableFactory | None = None,
        init_std: float = 0.01,
        l2_linear: float = 0.0,
        l2_factors: float = 0.0,
        distill_weight: float = 1.0,
    ) -> None:
        super().__init__()
        make_table = make_table or plain_tables()
        levels = torch.as_tensor(levels, dtype=torch.int64)
        if levels.shape != (num_rows,) or int(levels.max()) >= len(ranks) or int(levels.min()) < 0:
            raise ValueError(f"levels must be (N={num_rows},) in 0..{len(ranks) - 1}")
        self.ranks = tuple(int(k) for k in ranks)
        self.l2_linear, self.l2_factors, self.distill_weight = l2_linear, l2_factors, distill_weight
        self.register_buffer("level", levels.to(torch.int8))
        tables = [make_table("rafm_0", num_rows, self.ranks[0] + 1, partial(fm_init, std=init_std))]
        for lv in range(1, len(self.ranks)):
            at = levels >= lv
            remap = torch.where(at, torch.cumsum(at, 0), 0).to(torch.int32)  # 1..n_l, else 0
            self.register_buffer(f"remap_{lv}", remap)
            n_l = int(at.sum()) + 1
            tables.append(
                make_table(f"rafm_{lv}", n_l, self.ranks[lv], partial(_normal_init, std=init_std))
            )
        self.tables = nn.ModuleList(tables)
        self.bias = nn.Parameter(torch.zeros(()))
        output_range_buffer(self)

    def _gather(self, ids: Tensor) -> tuple[Tensor, list[Tensor]]:
        """One lookup per table: levels (B, F) and rows [w, v^0] (B, F, k_0+1), v^l (B, F, k_l)."""
        lvl = self.level[ids].to(torch.int64)
        rows = [self.tables[0](ids)]
        for lv in range(1, len(self.ranks)):
            compact = getattr(self, f"remap_{lv}")[ids].to(torch.int64)  # (B, F)
            rows.append(self.tables[lv](compact))
        return lvl, rows

    def _interaction(
        self, lvl: Tensor, rows: list[Tensor], x: Tensor
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Full pairwise term (B,); per level l < m-1 the distillation student B_l (gradient to
        level l's dependent factors only) and its detached teacher B_{l+1}: lists of (B,)."""
        total = x.new_zeros(x.shape[0])
        students, teachers = [], []
        for lv, r in enumerate(rows):
            v = r[..., 1:] if lv == 0 else r
            u = v * (x * (lvl >= lv)).unsqueeze(-1)  # (B, F, k_l): x_p v^l_p at level >= l
            s_f, q_f = _masked_sums(u, (lvl == lv).to(u.dtype))  # free: top level is l
            s_d, q_d = _masked_sums(u, (lvl > lv).to(u.dtype))  # dependent: reach above l
            if lv > 0:
                teachers.append((total + _half_sq(s_f + s_d) - 0.5 * (q_f + q_d)).detach())
            if lv < len(rows) - 1:
                s = s_f.detach() + s_d
                students.append(total.detach() + _half_sq(s) - 0.5 * (q_f.detach() + q_d))
            total = total + _half_sq(s_f + s_d) - _half_sq(s_d) - 0.5 * q_f
        return total, students, teachers

    def forward(self, ids: Tensor, values: Tensor) -> Tensor:
        """ids (B, F), values (B, F) -> raw output of the full model (B,)."""
        lvl, rows = self._gather(ids)
        x = values.to(rows[0].dtype)
        return self.bias + (rows[0][..., 0] * x).sum(1) + self._interaction(lvl, rows, x)[0]

    def objective(self, batch: Batch, task: str) -> dict[str, Tensor]:
        """The loss's parts: data (), l2 (), distill () and the full model's raw output (B,)."""
        lvl, rows = self._gather(batch.ids)
        x = batch.values.to(rows[0].dtype)
        pair, students, teachers = self._interaction(lvl, rows, x)
        head = self.bias + (rows[0][..., 0] * x).sum(1)  # (B,): w0 + linear
        raw = head + pair
        distill = raw.new_zeros(())
        for student, teacher in zip(students, teachers):
            h = head.detach()
            distill = distill + self.distill_weight * distill_loss(h + student, h + teacher, task)
        l2 = raw.new_zeros(())
        if self.l2_linear > 0 or self.l2_factors > 0:
            n, real = len(batch), (batch.ids != PAD_ID).to(x.dtype)
            l2 = self.l2_linear * row_l2(rows[0][..., :1], real, n)
            l2 = l2 + self.l2_factors * row_l2(rows[0][..., 1:], real, n)
            for lv in range(1, len(rows)):
                l2 = l2 + self.l2_factors * row_l2(rows[lv], real * (lvl >= lv), n)
        return {"data": data_loss(raw, batch.label, task), "l2": l2, "distill": distill, "raw": raw}

    def loss(self, batch: Batch, task: str) -> tuple[Tensor, Tensor]:
        """Full-model data loss + L2 on used rows + distillation; returns (loss (), raw (B,))."""
        parts = self.objective(batch, task)
        return parts["data"] + parts["l2"] + parts["distill"], parts["raw"]

    @torch.no_grad()
    def predict(
        self, ids: Tensor, values: Tensor, return_std: bool = False, low: bool = False
    ) -> Tensor:
        """Raw outputs (B,) clipped to `output_range`; low=True is RaFM-low, the FM of level-0
        factors only."""
        if return_std:
            raise UserError(
                "predictive std needs model.name=vfm; this model is rafm, so score "
                "it without the standard deviation"
            )
        if not low:
            return clip_output(self.forward(ids, values), self.output_range)
        rows0 = self.tables[0](ids)
        x = values.to(rows0.dtype)
        raw = self.bias + (rows0[..., 0] * x).sum(1) + pairwise(rows0[..., 1:] * x.unsqueeze(-1))
        return clip_output(raw, self.output_range)

    def num_params(self) -> int:
        return count_params(self)
