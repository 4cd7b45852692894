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

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Dedup", "dedupe", "expand", "bag", "coalesce", "CountingScratch"]

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


@numba.njit(cache=True, nogil=True)
def _count_dedupe(ids, counts, slot, uniq, inv, crow, perm):
    """Counting-sort dedupe of ids (M,) < N: counts, slot (N,) int64 scratch, zero on entry and
    on exit. Fills uniq (ascending), inv, crow, perm; returns U."""
    m_all, n = ids.shape[0], counts.shape[0]
    for m in range(m_all):
        if ids[m] < 0 or ids[m] >= n:
            for k in range(m):  # leave the scratch zero, then report
                counts[ids[k]] = 0
            return -1
        counts[ids[m]] += 1
    u = 0
    for r in range(counts.shape[0]):  # ascending: a scan of N, cheap when N is near M
        c = counts[r]
        if c:
            uniq[u] = r
            slot[r] = u
            crow[u + 1] = crow[u] + c
            u += 1
    for j in range(u):
        counts[uniq[j]] = crow[j]  # now the next free position of row uniq[j]
    for m in range(m_all):
        r = ids[m]
        k = slot[r]
        inv[m] = k
        perm[counts[r]] = m
        counts[r] += 1
    for j in range(u):
        counts[uniq[j]] = 0
        slot[uniq[j]] = 0
    return u


class CountingScratch:
    """Per-table scratch for the counting dedupe: two (N,) arrays, zero between calls."""

    def __init__(self, num_rows: int) -> None:
        self.counts = np.zeros(num_rows, np.int64)
        self.slot = np.zeros(num_rows, np.int64)


def _dedupe_counting(ids: Tensor, scratch: CountingScratch) -> Dedup:
    m = ids.numel()
    uniq = np.empty(min(m, scratch.counts.shape[0]), np.int64)
    inv, perm = np.empty(m, np.int64), np.empty(m, np.int64)
    crow = np.zeros(uniq.shape[0] + 1, np.int64)
    u = _count_dedupe(ids.numpy(), scratch.counts, scratch.slot, uniq, inv, crow, perm)
    if u < 0:
        raise IndexError(f"ids must be in [0, {scratch.counts.shape[0]})")
    return Dedup(
        torch.from_numpy(uniq[:u]), torch.from_numpy(inv),
        torch.from_numpy(crow[: u + 1]), torch.from_numpy(perm),
    )  # fmt: skip


def dedupe(ids: Tensor, scratch: CountingScratch | None = None) -> Dedup:
    """ids (M,) int64, non-negative -> Dedup. On CPU with a scratch (ids < its N, and N not
    much larger than M) one counting sort in O(M + N); else one sort (int32 keys when they
    fit: faster). Both give the same Dedup: the counting sort is stable too."""
    ids = ids.reshape(-1)
    if (
        scratch is not None
        and ids.device.type == "cpu"
        and ids.dtype == torch.int64
        and ids.numel()
        and scratch.counts.shape[0] <= 8 * ids.numel()
    ):
        return _dedupe_counting(ids.contiguous(), scratch)
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


def _group_matrix(dim: int, norms: tuple[tuple[int, int], ...], like: Tensor) -> Tensor:
    """(dim, G): column g has ones on rows a..b-1 of norms[g] = (a, b)."""
    gm = like.new_zeros(dim, len(norms))
    for g, (a, b) in enumerate(norms):
        gm[a:b, g] = 1
    return gm


class _Bag(torch.autograd.Function):
    """Per-example weighted sums of unique rows, and weighted squared norms of column groups;
    the backward is again a bag, over the (B, ...) output gradients: no (M, D) tensor exists
    in either pass."""

    @staticmethod
    def forward(ctx, rows: Tensor, d: Dedup, weights: Tensor, fields: int, norms: tuple):
        offsets = torch.arange(0, weights.shape[0], fields, device=weights.device)
        sums = _bag_sum(d.inv, rows, offsets, weights)  # (B, D)
        gm = _group_matrix(rows.shape[1], norms, rows)
        nsq = sums.new_zeros(sums.shape[0], 0)
        if norms:
            row_norms = (rows * rows) @ gm  # (U, G) squared norm of each group
            nsq = _bag_sum(d.inv, row_norms, offsets, weights * weights)  # (B, G)
        ctx.save_for_backward(rows, weights, gm)
        ctx.d, ctx.fields = d, fields
        return sums, nsq

    @staticmethod
    def backward(ctx, g_sums: Tensor | None, g_nsq: Tensor | None):
        rows, weights, gm = ctx.saved_tensors
        d, fields = ctx.d, ctx.fields
        example = d.perm // fields  # (M,) the example of each position, in sorted-id order
        w_sorted = weights.index_select(0, d.perm)
        starts = d.crow[:-1]
        has_nsq = g_nsq is not None and gm.shape[1] > 0
        if g_sums is not None:
            grad = _bag_sum(example, g_sums, starts, w_sorted)  # sum_m w_m g[b(m)]  (U, D)
        else:
            grad = torch.zeros_like(rows)
        if has_nsq:  # d|row_group|^2 = 2 row: scale each column by its group's summed gradient
            c = _bag_sum(example, g_nsq, starts, w_sorted * w_sorted)  # (U, G)
            scale = sum(c[:, g : g + 1] * gm[:, g] for g in range(gm.shape[1]))  # (U, D)
            grad.addcmul_(rows, scale, value=2)  # (a skinny (U, G) @ (G, D) mm is slower)
        grad_w = None
        if ctx.needs_input_grad[2]:  # values that require grad (rare): one (M, D) pass
            r = rows.index_select(0, d.inv)  # (M, D)
            grad_w = torch.zeros_like(weights)
            if g_sums is not None:
                grad_w += (r * g_sums.repeat_interleave(fields, 0)).sum(1)
            if has_nsq:
                per = (r * r) @ gm  # (M, G)
                grad_w += 2 * weights * (per * g_nsq.repeat_interleave(fields, 0)).sum(1)
        return grad, None, grad_w, None, None


def bag(
    rows: Tensor, d: Dedup, weights: Tensor, fields: int, norms: tuple[tuple[int, int], ...] = ()
) -> Tensor | tuple[Tensor, Tensor]:
    """Field sums over unique rows (U, D), ids == uniq[d.inv], M = B * fields, weights (M,):
    sums[b] = sum_f w[b, f] row[b, f] (B, D). With norms = ((a, b), ...) (G column ranges) also
    nsq[b, g] = sum_f w[b, f]^2 |row[b, f][a:b]|^2 (B, G), returned as (sums, nsq). For an FM
    row [w, v]: linear = sums[:, 0], pairwise = 0.5 (|sums[:, 1:]|^2 - nsq[:, 0]) with
    norms=((1, D),). Differentiable in rows (a coalesced (U, D) gradient) and weights."""
    norms = tuple((int(a), int(b)) for a, b in norms)
    sums, nsq = _Bag.apply(rows, d, weights.reshape(-1).to(rows.dtype), fields, norms)
    return (sums, nsq) if norms else sums


def coalesce(ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """ids (M,), values (M, D) -> unique ids (U,) ascending and per-id sums (U, D)."""
    d = dedupe(ids)
    return d.uniq, d.sum_rows(values)
