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

__all__ = ["Dedup", "dedupe", "expand", "bag", "coalesce"]

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
    def forward(ctx, rows: Tensor, d: Dedup) -> Tensor:
        ctx.d = d
        return rows.index_select(0, d.inv)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.d.sum_rows(grad), None


def expand(rows: Tensor, d: Dedup) -> Tensor:
    """rows (U, D) -> (M, D) = rows[d.inv], differentiable with a coalesced (U, D) gradient."""
    if rows.requires_grad:
        return _Expand.apply(rows, d)
    return rows.index_select(0, d.inv)


def _bag_sum(index: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """out[j] = sum of weights[i] * table[index[i]] over i in bag j (bags start at offsets)."""
    return F.embedding_bag(
        index, table.contiguous(), offsets, mode="sum", per_sample_weights=weights
    )


class _Bag(torch.autograd.Function):
    """Per-example weighted sums of unique rows, and of their squares; the backward is again a
    bag, over the (B, D) output gradients, so no (M, D) tensor exists in either pass."""

    @staticmethod
    def forward(ctx, rows: Tensor, d: Dedup, weights: Tensor, fields: int, squares: bool):
        offsets = torch.arange(0, weights.shape[0], fields, device=weights.device)
        # 0/1 weights (one-hot and padded fields) have w^2 = w: one bag over [rows, rows^2]
        binary = squares and torch.equal(weights * weights, weights)
        if binary:
            dim = rows.shape[1]
            table = rows.new_empty(rows.shape[0], 2 * dim)  # [rows, rows^2] (U, 2D)
            table[:, :dim] = rows
            torch.mul(rows, rows, out=table[:, dim:])
            both = _bag_sum(d.inv, table, offsets, weights)
            sums, sq = both[:, :dim].contiguous(), both[:, dim:].contiguous()
        else:
            sums = _bag_sum(d.inv, rows, offsets, weights)  # (B, D)
            sq = _bag_sum(d.inv, rows * rows, offsets, weights * weights) if squares else None
        ctx.save_for_backward(rows, weights)
        ctx.d, ctx.fields, ctx.squares, ctx.binary = d, fields, squares, binary
        return sums, sq if sq is not None else sums.new_zeros(sums.shape[0], 0)

    @staticmethod
    def backward(ctx, g_sums: Tensor | None, g_sq: Tensor | None):
        rows, weights = ctx.saved_tensors
        d, fields, dim = ctx.d, ctx.fields, rows.shape[1]
        example = d.perm // fields  # (M,) the example of each position, in sorted-id order
        w_sorted = weights.index_select(0, d.perm)
        starts = d.crow[:-1]
        g_sums = g_sums if g_sums is not None else rows.new_zeros(0, dim)  # absent: (0, D)
        has_sq = ctx.squares and g_sq is not None
        if has_sq and ctx.binary:  # sum_m w_m [g, g_sq][b(m)] in one bag
            both = _bag_sum(
                example, torch.cat([_or_zeros(g_sums, g_sq), g_sq], 1), starts, w_sorted
            )
            grad = torch.addcmul(both[:, :dim], both[:, dim:], rows, value=2)  # contiguous
        else:
            grad = rows.new_zeros(rows.shape)
            if g_sums.numel():
                grad += _bag_sum(example, g_sums, starts, w_sorted)  # sum_m w_m g[b(m)]
            if has_sq:
                grad += _bag_sum(example, g_sq, starts, w_sorted * w_sorted).mul_(rows).mul_(2)
        grad_w = None
        if ctx.needs_input_grad[2]:  # values that require grad (rare): one (M, D) pass
            r = rows.index_select(0, d.inv)  # (M, D)
            grad_w = torch.zeros_like(weights)
            if g_sums.numel():
                grad_w += (r * g_sums.repeat_interleave(fields, 0)).sum(1)
            if has_sq:
                grad_w += 2 * weights * (r * r * g_sq.repeat_interleave(fields, 0)).sum(1)
        return grad, None, grad_w, None, None


def _or_zeros(g: Tensor, like: Tensor) -> Tensor:
    return g if g.numel() else torch.zeros_like(like)


def bag(
    rows: Tensor, d: Dedup, weights: Tensor, fields: int, squares: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """FM-style field sums over unique rows (U, D) with ids == uniq[d.inv], M = B * fields:
    sums[b] = sum_f w[b, f] row[b, f] (B, D), and with squares=True also
    sq[b] = sum_f w[b, f]^2 row[b, f]^2 (B, D), elementwise. weights: (M,) = (B, fields) flat.
    Differentiable in rows (a coalesced (U, D) gradient) and weights."""
    sums, sq = _Bag.apply(rows, d, weights.reshape(-1).to(rows.dtype), fields, squares)
    return (sums, sq) if squares else sums


def coalesce(ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """ids (M,), values (M, D) -> unique ids (U,) ascending and per-id sums (U, D)."""
    d = dedupe(ids)
    return d.uniq, d.sum_rows(values)
