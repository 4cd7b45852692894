"""Embedding tables with sparse, fused updates: `SparseTable` (one process, or replicated across
ranks) and `RowShardedTable` (row r lives on rank r % W), plus `table_factory`.

Both hold their rows in a buffer (ravfm.distributed.rows.LocalRows: never an nn.Parameter, so no
dense gradient and no DDP). A forward pass with gradients enabled deduplicates the ids with one
sort, gathers the U unique rows and expands them (`table(ids)`, the contract of
ravfm.model.layers) or sums them per example (`table.bag(ids, values, norms)`, the FM terms
without a (B, F, dim) tensor); its backward hands the coalesced gradient (rows (U,), grads (U, dim)) to the
table, where a ravfm.distributed.optim optimizer picks it up in `step()`. Only the touched rows are
read or written: nothing walks the whole table.

Gradients across ranks are averaged (like DDP does for dense parameters): with a mean loss over
each rank's B/W examples, the update equals the single-process one on the global batch of B.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ravfm.distributed.lookup import Dedup, bag, coalesce, dedupe, expand
from ravfm.distributed.rows import LocalRows, SparseGrad
from ravfm.distributed.world import World
from ravfm.model.layers import Init, PlainTable, TableFactory

__all__ = ["SparseTable", "RowShardedTable", "table_factory"]


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

    def bag(self, ids: Tensor, weights: Tensor, norms: tuple[tuple[int, int], ...] = ()):
        """ids, weights (B, F) -> sums[b] = sum_f weights[b, f] * row(ids[b, f]) (B, dim); with
        norms = ((a, b), ...) also nsq[b, g] = sum_f weights^2 |row[a:b]|^2 (B, G), as
        (sums, nsq); see ravfm.distributed.lookup.bag. The FM terms without (B, F, dim) rows:
        linear = sums[:, 0], pairwise = 0.5 (|sums[:, 1:]|^2 - nsq[:, 0]), norms=((1, dim),)."""
        return self._bag(ids.reshape(-1), weights, ids.shape[-1], norms)

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
    def forward(ctx, rows: Tensor, world: World, recv: list[int], send: list[int]) -> Tensor:
        ctx.world, ctx.recv, ctx.send = world, recv, send
        return world.exchange(rows, recv, send)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
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

    def _route(self, flat: Tensor) -> tuple[Tensor, Dedup]:
        """flat (M,) global ids -> (their unique rows (U, dim), Dedup of the owner-sorted keys)."""
        w = self.world
        if flat.numel():
            lo, hi = torch.aminmax(flat)
            if int(lo) < 0 or int(hi) >= self.num_rows:
                raise IndexError(f"table {self.name}: ids must be in [0, {self.num_rows})")
        span = (self.num_rows + w.size - 1) // w.size  # local rows of rank 0 (the most)
        d = dedupe((flat % w.size) * span + flat // w.size)  # keys sort by owner, then local
        bounds = torch.arange(w.size + 1, device=flat.device) * span
        send_counts = torch.searchsorted(d.uniq, bounds).diff()  # (W,) unique ids per owner
        recv_counts = w.exchange_counts(send_counts.to(w.device))
        send, recv = send_counts.tolist(), recv_counts.tolist()
        local = d.uniq % span  # (U,) local index on the owner
        wanted = w.exchange(local.to(w.device), send, recv).to(self.storage.device)  # (R,)
        rows, d_owner = self._unique_rows(wanted)  # owner side: R requests, U' unique rows
        rows = expand(rows, d_owner)  # (R, dim)
        if rows.requires_grad:
            back = _Route.apply(rows, w, recv, send)
        else:
            back = w.exchange(rows, recv, send)
        return back.to(flat.device), d

    def forward(self, ids: Tensor) -> Tensor:
        """ids (...,) int64 in [0, num_rows) -> rows (..., dim)."""
        flat = ids.reshape(-1)
        if self.world.size == 1:
            return self._lookup(flat).view(*ids.shape, self.dim)
        return expand(*self._route(flat)).view(*ids.shape, self.dim)

    def bag(self, ids: Tensor, weights: Tensor, norms: tuple[tuple[int, int], ...] = ()):
        """ids, weights (B, F) -> field sums (B, dim) [and group norms]; as SparseTable.bag."""
        flat = ids.reshape(-1)
        if self.world.size == 1:
            return self._bag(flat, weights, ids.shape[-1], norms)
        return bag(*self._route(flat), weights, ids.shape[-1], norms)


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
