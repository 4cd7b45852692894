"""Embedding tables with sparse, fused updates: `SparseTable` (one process, or replicated across
ranks) and `RowShardedTable` (row r lives on rank r % W), plus `table_factory`.

Both hold their rows in a buffer `weight` (never an nn.Parameter, so no dense gradient and no
DDP). A forward pass with gradients enabled deduplicates the ids with one sort, gathers the U
unique rows and expands them; its backward hands the coalesced gradient (rows (U,), grads
(U, dim)) to the table, where a ravfm.dist.optim optimizer picks it up in `step()`. Only the
touched rows are read or written: nothing walks the whole table.

Gradients across ranks are averaged (like DDP does for dense parameters): with a mean loss over
each rank's B/W examples, the update equals the single-process one on the global batch of B.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ravfm.dist.lookup import Dedup, coalesce, dedupe, expand
from ravfm.dist.world import World
from ravfm.model.layers import Init, PlainTable, TableFactory

__all__ = ["SparseGrad", "LocalRows", "SparseTable", "RowShardedTable", "table_factory"]

_INIT_CHUNK = 1 << 16  # rows per init call; init draws the same numbers for any W


@dataclass
class SparseGrad:
    """rows (U,) local indices, ascending and unique; grad (U, dim); current (U, dim) the rows'
    present values when the forward pass already gathered them, else None."""

    rows: Tensor
    grad: Tensor
    current: Tensor | None = None


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

    init fills chunks of global rows in order, so the values do not depend on `size` (for
    inits such as normal_ and uniform_, whose draws do not depend on the chunking)."""
    local = (num_rows - rank + size - 1) // size
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


class _Lookup(torch.autograd.Function):
    """anchor (0,) requiring grad; gathers weight[d.uniq] and expands them to (M, dim).

    backward passes the coalesced (U, dim) gradient to `sink` and returns no gradient, so no
    dense or (M, dim) gradient is ever stored on a parameter."""

    @staticmethod
    def forward(ctx, anchor: Tensor, weight: Tensor, d: Dedup, sink: Callable) -> Tensor:  # type: ignore[override]
        rows = weight.index_select(0, d.uniq)  # (U, dim)
        ctx.d, ctx.rows, ctx.sink = d, rows, sink
        return rows.index_select(0, d.inv)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, None, None]:  # type: ignore[override]
        ctx.sink(SparseGrad(ctx.d.uniq, ctx.d.sum_rows(grad), ctx.rows))
        return None, None, None, None


class LocalRows(nn.Module):
    """Rows this rank holds (a buffer `weight` (L, dim)) and the gradients they received.

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
        self.register_buffer("weight", weight)
        self._grads: list[SparseGrad] = []

    def _lookup(self, local: Tensor) -> Tensor:
        """local (M,) indices -> (M, dim), differentiable into this table's sparse gradient."""
        if not torch.is_grad_enabled():
            return self.weight.index_select(0, local)
        anchor = torch.empty(0, device=self.weight.device, requires_grad=True)
        return _Lookup.apply(anchor, self.weight, dedupe(local), self._grads.append)

    def _local_grad(self) -> SparseGrad | None:
        """This rank's gradients since the last step, coalesced (U unique ascending rows)."""
        if not self._grads:
            return None
        if len(self._grads) == 1:
            return self._grads[0]
        rows, grad = coalesce(
            torch.cat([g.rows for g in self._grads]), torch.cat([g.grad for g in self._grads])
        )
        return SparseGrad(rows, grad, None)

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
        g = global_ids.to(self.weight.device, torch.int64)
        mask = (g % self._stride == self._offset) & (g >= 0) & (g < self.num_rows)
        return mask, g[mask] // self._stride

    def export_local(self) -> Tensor:
        """Local indices of the rows this rank writes to a checkpoint (every row it owns)."""
        return torch.arange(self.weight.shape[0], device=self.weight.device)

    def export_rows(self) -> tuple[Tensor, Tensor]:
        """Rows this rank owns: global ids (n,) int64 ascending, weights (n, dim)."""
        local = self.export_local()
        return self.global_ids(local), self.weight.index_select(0, local)

    @torch.no_grad()
    def import_rows(self, global_ids: Tensor, weights: Tensor) -> None:
        """Overwrite the rows among global_ids (n,) that live here with weights (n, dim)."""
        mask, local = self.local_index(global_ids)
        self.weight.index_copy_(0, local, weights.to(self.weight)[mask])
        self.zero_grad()

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, num_rows={self.num_rows}, dim={self.dim}, "
            f"local_rows={self.weight.shape[0]}, dtype={self.weight.dtype}"
        )


class SparseTable(LocalRows):
    """Every row on this rank. With a world of W > 1 ranks the table is replicated: the sparse
    gradients of all ranks are gathered and averaged, so every replica applies the same update;
    each rank exports the rows r % W == rank (the union over ranks is the table once)."""

    def __init__(
        self,
        name: str,
        num_rows: int,
        dim: int,
        init: Init,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        world: World | None = None,
    ) -> None:
        super().__init__(name, num_rows, dim, init, 0, 1, dtype, device)
        self.world = world or World.single(device)

    def forward(self, ids: Tensor) -> Tensor:
        """ids (...,) int64 in [0, num_rows) -> rows (..., dim)."""
        return self._lookup(ids.reshape(-1)).view(*ids.shape, self.dim)

    def sparse_grad(self) -> SparseGrad | None:
        w = self.world
        if w.size == 1:
            return self._local_grad()
        g = self._local_grad()  # every rank joins the gathers, touched rows or not
        rows = g.rows if g is not None else torch.zeros(0, dtype=torch.int64, device=w.device)
        grad = g.grad if g is not None else self.weight.new_zeros((0, self.dim))
        rows, grad = coalesce(w.all_gather_v(rows.to(w.device)), w.all_gather_v(grad.to(w.device)))
        return SparseGrad(rows.to(self.weight.device), grad.to(self.weight.device) / w.size)

    def export_local(self) -> Tensor:
        w = self.world
        return torch.arange(w.rank, self.num_rows, w.size, device=self.weight.device)


class _Route(torch.autograd.Function):
    """Rows looked up by their owners (R, dim) -> back to the requesting ranks (U, dim);
    backward routes the gradients the reverse way, averaged over the W ranks."""

    @staticmethod
    def forward(ctx, rows: Tensor, world: World, recv: list[int], send: list[int]) -> Tensor:  # type: ignore[override]
        ctx.world, ctx.recv, ctx.send = world, recv, send
        return world.exchange(rows, recv, send)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        w = ctx.world
        return w.exchange(grad.contiguous() / w.size, ctx.send, ctx.recv), None, None, None


class RowShardedTable(LocalRows):
    """Row r lives on rank r % W at local index r // W (table bytes / W per rank).

    forward: unique ids -> all_to_all to their owners -> owners gather -> all_to_all back ->
    expand; backward: the same routes in reverse. Every rank must call forward (and backward)
    the same number of times in the same order: each is a collective."""

    def __init__(
        self,
        name: str,
        num_rows: int,
        dim: int,
        init: Init,
        world: World,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            name,
            num_rows,
            dim,
            init,
            world.rank,
            world.size,
            dtype,
            device if device is not None else world.device,
        )
        self.world = world

    def forward(self, ids: Tensor) -> Tensor:
        """ids (...,) int64 in [0, num_rows) -> rows (..., dim)."""
        w, flat = self.world, ids.reshape(-1)
        if w.size == 1:
            return self._lookup(flat).view(*ids.shape, self.dim)
        span = (self.num_rows + w.size - 1) // w.size  # local rows of rank 0 (the most)
        keys = (flat % w.size) * span + flat // w.size  # sorts by owner, then local index
        if flat.numel():
            lo, hi = torch.aminmax(flat)
            if int(lo) < 0 or int(hi) >= self.num_rows:
                raise IndexError(f"table {self.name}: ids must be in [0, {self.num_rows})")
        d = dedupe(keys)
        bounds = torch.arange(w.size + 1, device=keys.device) * span
        send_counts = torch.searchsorted(d.uniq, bounds).diff()  # (W,) unique ids per owner
        recv_counts = w.exchange_counts(send_counts.to(w.device))
        send, recv = send_counts.tolist(), recv_counts.tolist()
        local = d.uniq % span  # (U,) local index on the owner
        wanted = w.exchange(local.to(w.device), send, recv).to(self.weight.device)  # (R,)
        rows = self._lookup(wanted)  # (R, dim) owner side
        if rows.requires_grad:
            back = _Route.apply(rows, w, recv, send)
        else:
            back = w.exchange(rows, recv, send)
        return expand(back.to(ids.device), d).view(*ids.shape, self.dim)


def table_factory(
    kind: str,
    world: World,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TableFactory:
    """make_table(name, num_rows, dim, init) for kind plain | sparse | rows.

    plain: ravfm.model.layers.PlainTable (dense parameter, the reference; with W > 1 its dense
    gradient is all-reduced like any parameter). sparse: SparseTable (replicated when W > 1).
    rows: RowShardedTable over `world`."""
    device = torch.device(device) if device is not None else world.device
    if kind not in ("plain", "sparse", "rows"):
        raise ValueError(f"table kind {kind!r} is not one of plain, sparse, rows")

    def make(name: str, num_rows: int, dim: int, init: Init) -> nn.Module:
        if kind == "plain":
            return PlainTable(name, num_rows, dim, init, dtype=dtype).to(device)
        if kind == "sparse":
            return SparseTable(name, num_rows, dim, init, dtype, device, world=world)
        return RowShardedTable(name, num_rows, dim, init, world, dtype, device)

    return make
