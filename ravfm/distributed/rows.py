"""`LocalRows`: the rows of a table that live on this rank, packed with their optimizer state,
and the deduplicated, differentiable lookup into them.

Storage is one buffer `storage` (L, dim + S): columns [0, dim) are the weights (`weight` is a
view), columns [dim, dim + S) the state a sparse optimizer reserved (S = 0 without one). Packing
matters on CPU: gathering or writing a row costs about the same for 17 or 34 floats (a cache
miss per row), so an optimizer step touches each row once for weights and state together.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ravfm.distributed.lookup import CountingScratch, Dedup, bag, coalesce, dedupe, expand
from ravfm.model.layers import Init

__all__ = ["SparseGrad", "LocalRows"]

_INIT_CHUNK = 1 << 16  # rows per init call; init draws the same numbers for any W


@dataclass
class SparseGrad:
    """rows (U,) local indices, ascending and unique; grad (U, dim); packed (U, dim + S) the
    rows' storage as the forward pass gathered it (still current before the step), or None."""

    rows: Tensor
    grad: Tensor
    packed: Tensor | None = None


_SKIP_INIT = contextvars.ContextVar("ravfm_skip_init", default=False)


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Row tables made inside start as zeros instead of drawing their init: for a model about
    to load a checkpoint, which holds every row (2**20 x 17 normal draws were ~1 s of each
    scoring actor's start-up)."""
    token = _SKIP_INIT.set(True)
    try:
        yield
    finally:
        _SKIP_INIT.reset(token)


def _owned_rows_init(
    init: Init,
    num_rows: int,
    dim: int,
    rank: int,
    size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Rows r = rank, rank + size, ... of the table `init` would make in one call: (L, dim).

    init fills chunks of global rows in order, so the values do not depend on `size` (for inits
    such as normal_ and uniform_, whose draws do not depend on the chunking)."""
    local = (num_rows - rank + size - 1) // size
    if _SKIP_INIT.get():
        return torch.zeros(local, dim, dtype=dtype, device=device)
    out = torch.empty(local, dim, dtype=dtype, device=device)
    if size == 1 and num_rows <= _INIT_CHUNK:
        init(out)
        return out
    chunk = _INIT_CHUNK - _INIT_CHUNK % size
    for start in range(0, num_rows, chunk):
        tmp = torch.empty(min(chunk, num_rows - start), dim, dtype=dtype, device=device)
        init(tmp)
        part = tmp[rank::size]  # global rows start + rank + j * size; start % size == 0
        out[start // size : start // size + part.shape[0]] = part
    return out


class _Gather(torch.autograd.Function):
    """anchor (0,) requiring grad -> the weights of rows d.uniq (U, dim), gathered with their
    state; backward hands the (U, dim) gradient to `sink` and returns none, so no gradient is
    ever kept on a table-sized tensor."""

    @staticmethod
    def forward(ctx, anchor: Tensor, storage: Tensor, dim: int, d: Dedup, sink: Callable) -> Tensor:
        packed = storage.index_select(0, d.uniq)  # (U, dim + S)
        ctx.d, ctx.packed, ctx.sink = d, packed, sink
        return packed if packed.shape[1] == dim else packed[:, :dim].contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, ...]:
        ctx.sink(SparseGrad(ctx.d.uniq, grad, ctx.packed))
        return None, None, None, None, None


class LocalRows(nn.Module):
    """Rows of a num_rows x dim table stored on this rank, with their gradients and state.

    Global row g is stored here when g % stride == offset, at local index g // stride."""

    def __init__(
        self,
        name: str,
        num_rows: int,
        dim: int,
        init: Init,
        offset: int,
        stride: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.name, self.num_rows, self.dim = name, int(num_rows), int(dim)
        self._offset, self._stride = offset, stride
        weight = _owned_rows_init(
            init, self.num_rows, self.dim, offset, stride, dtype, torch.device(device)
        )
        self.register_buffer("storage", weight)
        self._grads: list[SparseGrad] = []
        self._scratch: CountingScratch | None = None  # the training lookups' dedupe scratch

    @property
    def weight(self) -> Tensor:
        """(L, dim) view of this rank's weights."""
        return self.storage[:, : self.dim]

    def reserve_state(self, width: int, fill: float = 0.0) -> None:
        """Make room for `width` state columns per row, set to `fill` (drops any earlier ones)."""
        packed = self.storage.new_full((self.storage.shape[0], self.dim + width), fill)
        packed[:, : self.dim] = self.weight
        self.storage = packed
        self.zero_grad()

    def gather(self, rows: Tensor) -> Tensor:
        """rows (U,) local -> packed storage rows (U, dim + S)."""
        return self.storage.index_select(0, rows)

    def scatter(self, rows: Tensor, packed: Tensor) -> None:
        """Write packed rows (U, dim + S) back to local rows (U,)."""
        dst, src = self.storage, packed.contiguous()
        if dst.element_size() == 4 and dst.shape[1] % 2 == 0:
            dst, src = dst.view(torch.float64), src.view(torch.float64)  # same bits, half the
        dst.index_copy_(0, rows, src)  # elements: index_copy_ costs per element on CPU

    def _unique_rows(self, local: Tensor) -> tuple[Tensor, Dedup]:
        """local (M,) indices -> (rows (U, dim) of the unique indices, Dedup); the rows are
        differentiable into this table's sparse gradient when gradients are enabled."""
        if not torch.is_grad_enabled():  # (no shared scratch: inference may run in threads)
            d = dedupe(local)
            return self.weight.index_select(0, d.uniq), d
        if self._scratch is None and self.storage.device.type == "cpu":
            self._scratch = CountingScratch(self.storage.shape[0])
        d = dedupe(local, self._scratch)
        anchor = torch.empty(0, device=self.storage.device, requires_grad=True)
        return _Gather.apply(anchor, self.storage, self.dim, d, self._grads.append), d

    def _lookup(self, local: Tensor) -> Tensor:
        """local (M,) indices -> (M, dim)."""
        if not torch.is_grad_enabled():
            return self.weight.index_select(0, local)
        return expand(*self._unique_rows(local))

    def _local_grad(self) -> SparseGrad | None:
        """This rank's gradients since the last step, coalesced (U unique ascending rows)."""
        if len(self._grads) <= 1:
            return self._grads[0] if self._grads else None
        rows, grad = coalesce(
            torch.cat([g.rows for g in self._grads]), torch.cat([g.grad for g in self._grads])
        )
        return SparseGrad(rows, grad)

    def _bag(self, local: Tensor, weights: Tensor, fields: int, norms: tuple = ()):
        """local, weights (B * fields,) -> ravfm.distributed.lookup.bag of the rows."""
        rows, d = self._unique_rows(local)
        return bag(rows, d, weights, fields, norms)

    def sparse_grad(self) -> SparseGrad | None:
        """The gradient an optimizer applies to this rank's rows; None if no row was touched."""
        return self._local_grad()

    def zero_grad(self) -> None:
        self._grads = []

    def global_ids(self, local: Tensor) -> Tensor:
        """local (n,) -> global row ids (n,)."""
        return local * self._stride + self._offset

    def local_index(self, global_ids: Tensor) -> tuple[Tensor, Tensor]:
        """global_ids (n,) -> (mask (n,) of rows stored here, their local indices (m,))."""
        g = global_ids.to(self.storage.device, torch.int64)
        mask = (g % self._stride == self._offset) & (g >= 0) & (g < self.num_rows)
        return mask, g[mask] // self._stride

    def export_local(self) -> Tensor:
        """Local indices of the rows this rank writes to a checkpoint (every row it owns)."""
        return torch.arange(self.storage.shape[0], device=self.storage.device)

    def export_rows(self) -> tuple[Tensor, Tensor]:
        """Rows this rank owns: global ids (n,) int64 ascending, weights (n, dim)."""
        local = self.export_local()
        return self.global_ids(local), self.weight.index_select(0, local)

    @torch.no_grad()
    def import_rows(self, global_ids: Tensor, weights: Tensor) -> None:
        """Overwrite the rows among global_ids (n,) that live here with weights (n, dim)."""
        mask, local = self.local_index(global_ids)
        self.weight.index_copy_(0, local, weights.to(self.storage)[mask])
        self.zero_grad()

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, num_rows={self.num_rows}, dim={self.dim}, "
            f"local_rows={self.storage.shape[0]}, state_columns="
            f"{self.storage.shape[1] - self.dim}, dtype={self.storage.dtype}"
        )
