"""Factorization machine (Rendle 2010): y = w0 + sum_i x_i w_i + sum_{i<j} <v_i, v_j> x_i x_j.

One table "fm" of (N, K+1) rows packed as [w_i, v_i (K)], so a batch does a single gather; the
global bias w0 is a dense parameter. The pairwise term uses the square-of-sum identity reduced
over fields, O(F K) per example. Padding (id 0, value 0.0) contributes nothing: its value zeroes
it in the output and its mask drops it from the L2 term.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from ravfm.batch import PAD_ID, Batch
from ravfm.errors import UserError
from ravfm.model.layers import (
    TableFactory,
    clip_output,
    count_params,
    output_range_buffer,
    pairwise,
    plain_tables,
)
from ravfm.model.losses import data_loss, row_l2

__all__ = ["FM", "fm_init"]


def fm_init(w: Tensor, std: float) -> None:
    """Fill FM rows (n, K+1) in place: linear weight 0, factors N(0, std^2)."""
    w[:, 0].zero_()
    w[:, 1:].normal_(0.0, std)


class FM(nn.Module):
    """Rendle's FM over a table from `make_table` (K factors per row)."""

    def __init__(
        self,
        num_rows: int,
        k: int,
        *,
        make_table: TableFactory | None = None,
        init_std: float = 0.01,
        l2_linear: float = 0.0,
        l2_factors: float = 0.0,
        unit_values: bool = False,
    ) -> None:
        """unit_values: every value is 0 or 1 (hashed categoricals, no multi-valued field), so
        the L2 sums come from the same fused lookup as the output (decided once, never per
        batch: with a row-sharded table every rank must make the same lookups)."""
        super().__init__()
        self.unit_values = unit_values
        make_table = make_table or plain_tables()
        self.k, self.l2_linear, self.l2_factors = k, l2_linear, l2_factors
        self.table = make_table("fm", num_rows, k + 1, partial(fm_init, std=init_std))
        self.bias = nn.Parameter(torch.zeros(()))
        output_range_buffer(self)

    def _output(self, rows: Tensor, values: Tensor) -> Tensor:
        """rows (B, F, K+1), values (B, F) -> raw (B,)."""
        x = values.to(rows.dtype)
        linear = (rows[..., 0] * x).sum(dim=1)
        return self.bias + linear + pairwise(rows[..., 1:] * x.unsqueeze(-1))

    def _bagged(
        self, ids: Tensor, values: Tensor, extra: tuple[tuple[int, int], ...] = ()
    ) -> tuple[Tensor, Tensor]:
        """The same raw (B,) from the table's per-example sums, with no (B, F, K+1) rows:
        sums = sum_f x_f [w_f, v_f] (B, K+1), nsq[:, 0] = sum_f x_f^2 |v_f|^2; `extra` column
        ranges add further norms nsq[:, 1:]. Returns (raw (B,), nsq (B, 1 + len(extra)))."""
        sums, nsq = self.table.bag(ids, values, norms=((1, self.k + 1), *extra))
        s = sums[:, 1:]
        return self.bias + sums[:, 0] + 0.5 * ((s * s).sum(dim=1) - nsq[:, 0]), nsq

    def forward(self, ids: Tensor, values: Tensor) -> Tensor:
        """ids (B, F) int64, values (B, F) -> raw output (B,): logits or ratings."""
        if hasattr(self.table, "bag"):  # sparse and row-sharded tables: fused field sums
            return self._bagged(ids, values)[0]
        return self._output(self.table(ids), values)

    def loss(self, batch: Batch, task: str) -> tuple[Tensor, Tensor]:
        """Mean data loss + L2 on the rows used in the batch; returns (loss (), raw (B,))."""
        if hasattr(self.table, "bag"):
            return self._bagged_loss(batch, task)
        rows = self.table(batch.ids)  # (B, F, K+1)
        raw = self._output(rows, batch.values)
        loss = data_loss(raw, batch.label, task)
        if self.l2_linear > 0 or self.l2_factors > 0:
            mask = (batch.ids != PAD_ID).to(rows.dtype)
            n = len(batch)
            loss = (
                loss
                + self.l2_linear * row_l2(rows[..., :1], mask, n)
                + self.l2_factors * row_l2(rows[..., 1:], mask, n)
            )
        return loss, raw

    def _bagged_loss(self, batch: Batch, task: str) -> tuple[Tensor, Tensor]:
        if not (self.l2_linear > 0 or self.l2_factors > 0):
            raw = self._bagged(batch.ids, batch.values)[0]
            return data_loss(raw, batch.label, task), raw
        if self.unit_values:
            # 0/1 values: x^2 is the padding mask, so the norms of the one bag are the L2 sums
            # too: |v|^2 is nsq[:, 0], and |w|^2 comes from an extra column range.
            raw, nsq = self._bagged(batch.ids, batch.values, ((0, 1),))
            lin, fac = nsq[:, 1], nsq[:, 0]
        else:
            mask = (batch.ids != PAD_ID).to(batch.values.dtype)
            raw = self._bagged(batch.ids, batch.values)[0]
            l2 = self.table.bag(batch.ids, mask, norms=((0, 1), (1, self.k + 1)))[1]  # (B, 2)
            lin, fac = l2[:, 0], l2[:, 1]
        reg = self.l2_linear * lin.sum() + self.l2_factors * fac.sum()
        return data_loss(raw, batch.label, task) + reg / max(1, len(batch)), raw

    @torch.no_grad()
    def predict(self, ids: Tensor, values: Tensor, return_std: bool = False) -> Tensor:
        """Raw outputs (B,) without gradients, clipped to `output_range`. FM has no
        predictive distribution."""
        if return_std:
            raise UserError(
                "predictive std needs model.name=vfm; this model is fm, so score "
                "it without the standard deviation"
            )
        return clip_output(self.forward(ids, values), self.output_range)

    def num_params(self) -> int:
        return count_params(self)
