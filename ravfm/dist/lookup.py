"""Deduplicated row lookup: one sort of the ids gives the unique rows, the inverse map and the
CSR matrix that sums gradients back onto the unique rows.

Why a sort and a segment sum: on CPU, `index_add_`/`embedding_dense_backward` pay a per-index
cost and write rows in random order, while a segment sum reads each gradient row once and writes
the U output rows in order. It runs as an embedding bag over the gradient rows (FBGEMM on CPU),
or as a CSR (U, M) x (M, D) product for float64 on CPU, where FBGEMM has no kernel. The sort
also makes the unique ids ascending, so the optimizer's gathers and writes walk the table in
order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Dedup", "dedupe", "expand", "coalesce"]

_INT32_MAX = 2**31 - 1


@dataclass
class Dedup:
    """uniq (U,) int64 ascending; inv (M,) int64 with ids == uniq[inv]; crow (U+1,) int64 and
    perm (M,) int64: positions perm[crow[u]:crow[u+1]] hold uniq[u]."""

    uniq: Tensor
    inv: Tensor
    crow: Tensor
    perm: Tensor

    @property
    def counts(self) -> Tensor:
        """(U,) occurrences of each unique id."""
        return self.crow[1:] - self.crow[:-1]

    def sum_rows(self, values: Tensor) -> Tensor:
        """values (M, D) -> (U, D): out[u] = sum of values[m] over m with ids[m] == uniq[u]."""
        m, u = self.perm.shape[0], self.uniq.shape[0]
        if m == 0:
            return values.new_zeros((u, values.shape[1]))
        if values.dtype != torch.float64 or values.is_cuda:
            # bag u sums the rows perm[crow[u]:crow[u+1]] of `values` (FBGEMM on CPU)
            return F.embedding_bag(self.perm, values.contiguous(), self.crow[:-1], mode="sum")
        ones = torch.ones(m, dtype=values.dtype, device=values.device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": this use is tested
            warnings.simplefilter("ignore")
            csr = torch.sparse_csr_tensor(
                self.crow, self.perm, ones, size=(u, m), check_invariants=False
            )
            return csr @ values.contiguous()


def dedupe(ids: Tensor) -> Dedup:
    """ids (M,) int64, non-negative -> Dedup. One sort (int32 keys when they fit: faster)."""
    ids = ids.reshape(-1)
    small = ids.numel() > 0 and int(ids.max()) <= _INT32_MAX
    keys = ids.to(torch.int32) if small else ids
    sorted_keys, perm = torch.sort(keys)
    uniq, inv_sorted, counts = torch.unique_consecutive(
        sorted_keys, return_inverse=True, return_counts=True
    )
    inv = torch.empty_like(inv_sorted).scatter_(0, perm, inv_sorted)
    crow = torch.zeros(uniq.shape[0] + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return Dedup(uniq.to(torch.int64), inv, crow, perm)


class _Expand(torch.autograd.Function):
    """rows (U, D) -> rows[inv] (M, D); the backward sums gradients per unique row (CSR)."""

    @staticmethod
    def forward(ctx, rows: Tensor, d: Dedup) -> Tensor:  # type: ignore[override]
        ctx.d = d
        return rows.index_select(0, d.inv)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.d.sum_rows(grad), None


def expand(rows: Tensor, d: Dedup) -> Tensor:
    """rows (U, D) -> (M, D) = rows[d.inv], differentiable with a coalesced (U, D) gradient."""
    if rows.requires_grad:
        return _Expand.apply(rows, d)
    return rows.index_select(0, d.inv)


def coalesce(ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """ids (M,), values (M, D) -> unique ids (U,) ascending and per-id sums (U, D)."""
    d = dedupe(ids)
    return d.uniq, d.sum_rows(values)
