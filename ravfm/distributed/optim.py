"""Row-wise sparse optimizers for embedding tables, and `build_optimizers`.

Each optimizer steps every table of a model in one fused pass over the touched rows: the state
sits in the table's packed storage beside the weights (ravfm.distributed.rows), the forward pass already
gathered those rows, the update runs in place on them, and one index_copy_ writes them back.
Untouched rows are neither read nor written (their bits do not change), and nothing walks the
whole table.

Semantics (g: a touched row's coalesced gradient, summed over its occurrences in the batch):
  SparseSGD      w -= lr g
  SparseAdagrad  s += g^2; w -= lr g / (sqrt(s) + eps)           (torch.optim.Adagrad, lr_decay 0)
                 rowwise=True keeps one s per row: s += mean(g^2) (TorchRec's row-wise Adagrad)
  SparseAdam     lazy Adam: a row's moments m, v and its step count t change only when the row
                 is touched, t_row += 1; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
                 w -= lr / (1 - b1^t_row) * m / (sqrt(v / (1 - b2^t_row)) + eps). This is
                 torch.optim.Adam applied to each row only on the steps that touch it (not
                 torch.optim.SparseAdam, which bias-corrects with the global step count).
No weight decay: the models add L2 on the touched rows to their loss, once.

State lives beside each table (same rows, same rank) and is exported / imported by global row id
(`export_state`, `import_state`), so a checkpoint resumes on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ravfm.config import OptimConfig
from ravfm.distributed.dense import DenseOptimizer
from ravfm.distributed.rows import LocalRows, SparseGrad
from ravfm.errors import UserError
from ravfm.model.layers import dense_parameters, is_table

__all__ = ["SparseOptimizer", "SparseSGD", "SparseAdagrad", "SparseAdam", "build_optimizers"]


class _DenseRows:
    """A table whose weight is a dense nn.Parameter (PlainTable) seen as rows, with its state in a
    separate tensor. Touched rows are those with a nonzero gradient (a dense pass: PlainTable is
    the slow reference)."""

    def __init__(self, table: nn.Module) -> None:
        self.table, self.name = table, getattr(table, "name", "table")
        self.dim = int(table.weight.shape[1])
        self.state_columns = self.weight.new_zeros((self.weight.shape[0], 0))

    @property
    def weight(self) -> Tensor:
        return self.table.weight.data

    def reserve_state(self, width: int, fill: float = 0.0) -> None:
        self.state_columns = self.weight.new_full((self.weight.shape[0], width), fill)

    def gather(self, rows: Tensor) -> Tensor:
        return torch.cat([self.weight[rows], self.state_columns[rows]], dim=1)

    def scatter(self, rows: Tensor, packed: Tensor) -> None:
        self.weight.index_copy_(0, rows, packed[:, : self.dim])
        self.state_columns.index_copy_(0, rows, packed[:, self.dim :])

    def sparse_grad(self) -> SparseGrad | None:
        g = self.table.weight.grad
        if g is None:
            return None
        if g.is_sparse:
            g = g.coalesce()
            return SparseGrad(g.indices()[0], g.values())
        rows = (g != 0).any(dim=1).nonzero().squeeze(1)
        return SparseGrad(rows, g.index_select(0, rows))

    def zero_grad(self) -> None:
        self.table.weight.grad = None

    def global_ids(self, local: Tensor) -> Tensor:
        return local

    def local_index(self, global_ids: Tensor) -> tuple[Tensor, Tensor]:
        g = global_ids.to(self.weight.device, torch.int64)
        mask = (g >= 0) & (g < self.weight.shape[0])
        return mask, g[mask]

    def export_local(self) -> Tensor:
        return torch.arange(self.weight.shape[0], device=self.weight.device)


def _rows_view(table: nn.Module) -> LocalRows | _DenseRows:
    return table if isinstance(table, LocalRows) else _DenseRows(table)


def _state_columns(t: LocalRows | _DenseRows) -> Tensor:
    return t.storage[:, t.dim :] if isinstance(t, LocalRows) else t.state_columns


class SparseOptimizer:
    """Steps the touched rows of every table. tables: {key: table} (keys name the state in
    checkpoints) or a list of tables (keyed by their names). `lr` may be changed between steps.

    Construction reserves the state columns in each table's packed storage (ravfm.distributed.rows),
    so build the optimizer after the model is on its device and dtype."""

    def __init__(self, tables: Mapping[str, nn.Module] | list[nn.Module], lr: float) -> None:
        if not isinstance(tables, Mapping):
            tables = {getattr(t, "name", f"table{i}"): t for i, t in enumerate(tables)}
        self.tables = {k: _rows_view(t) for k, t in tables.items()}
        self.lr = float(lr)
        self._layout: dict[str, dict[str, tuple[int, int]]] = {}
        for key, t in self.tables.items():
            spec, start, layout = self._spec(t.dim), 0, {}
            for name, width, _ in spec:
                layout[name] = (start, start + width)
                start += width
            t.reserve_state(start)
            cols = _state_columns(t)
            for name, _, fill in spec:
                cols[:, slice(*layout[name])].fill_(fill)
            self._layout[key] = layout

    def _spec(self, dim: int) -> list[tuple[str, int, float]]:
        """State per row: (name, columns, initial value) for a table of `dim` columns."""
        return []

    def _update(self, w: Tensor, g: Tensor, state: dict[str, Tensor]) -> None:
        """Update w (U, dim) and the state views (U, width) in place from the gradient g."""
        raise NotImplementedError

    @property
    def state(self) -> dict[str, dict[str, Tensor]]:
        """{key: {name: (L, width) view, (L,) when width is 1}} of every table's state."""
        out = {}
        for key, t in self.tables.items():
            cols = _state_columns(t)
            out[key] = {n: _squeeze(cols[:, a:b]) for n, (a, b) in self._layout[key].items()}
        return out

    @torch.no_grad()
    def step(self) -> None:
        """Apply and clear the gradients every table collected since the last step."""
        for key, t in self.tables.items():
            g = t.sparse_grad()
            t.zero_grad()
            if g is None or g.rows.numel() == 0:
                continue
            packed = g.packed if g.packed is not None else t.gather(g.rows)  # (U, dim + S)
            d = t.dim
            state = {n: packed[:, d + a : d + b] for n, (a, b) in self._layout[key].items()}
            self._update(packed[:, :d], g.grad, state)
            t.scatter(g.rows, packed)

    def zero_grad(self) -> None:
        for t in self.tables.values():
            t.zero_grad()

    def export_state(self) -> dict[str, Tensor]:
        """{key/ids: global row ids (n,), key/NAME: state rows (n,) or (n, width)} for the rows
        each table exports on this rank."""
        out: dict[str, Tensor] = {}
        for key, t in self.tables.items():
            if not self._layout[key]:
                continue
            local = t.export_local()
            out[f"{key}/ids"] = t.global_ids(local)
            for name, s in self.state[key].items():
                out[f"{key}/{name}"] = s.index_select(0, local)
        return out

    @torch.no_grad()
    def import_state(self, state: Mapping[str, Tensor]) -> None:
        """Load the rows of `state` (export_state's layout) that live on this rank; others are
        ignored, so every rank may read every rank's file."""
        for key, t in self.tables.items():
            if f"{key}/ids" not in state:
                continue
            mask, local = t.local_index(state[f"{key}/ids"])
            cols = _state_columns(t)
            for name, (a, b) in self._layout[key].items():
                if f"{key}/{name}" not in state:
                    raise UserError(
                        f"checkpoint optimizer state of table {key} has no {name!r} (it was "
                        f"written by another optim.sparse); resume with that optimizer"
                    )
                rows = state[f"{key}/{name}"].to(cols)[mask]
                cols[:, a:b].index_copy_(0, local, rows.reshape(-1, b - a))


def _squeeze(t: Tensor) -> Tensor:
    return t.squeeze(1) if t.shape[1] == 1 else t


class SparseSGD(SparseOptimizer):
    """w -= lr g on the touched rows."""

    def _update(self, w: Tensor, g: Tensor, state: dict[str, Tensor]) -> None:
        w.add_(g, alpha=-self.lr)


class SparseAdagrad(SparseOptimizer):
    """Adagrad on the touched rows: element-wise accumulators (as torch.optim.Adagrad), or one
    per row with rowwise=True (state N instead of N x dim)."""

    def __init__(
        self,
        tables: Mapping[str, nn.Module] | list[nn.Module],
        lr: float = 0.05,
        eps: float = 1e-10,
        initial_accumulator: float = 0.0,
        rowwise: bool = False,
    ) -> None:
        self.eps, self.initial, self.rowwise = eps, initial_accumulator, rowwise
        super().__init__(tables, lr)

    def _spec(self, dim: int) -> list[tuple[str, int, float]]:
        return [("sum", 1 if self.rowwise else dim, self.initial)]

    def _update(self, w: Tensor, g: Tensor, state: dict[str, Tensor]) -> None:
        s = state["sum"]  # (U, dim) or (U, 1), strided views into the packed rows
        if self.rowwise:
            std = s.add_(g.square().mean(dim=1, keepdim=True)).sqrt().add_(self.eps)
        else:
            new = torch.addcmul(s, g, g)  # contiguous: math on strided views is slow on CPU
            s.copy_(new)
            std = new.sqrt_().add_(self.eps)
        w.addcdiv_(g, std, value=-self.lr)


class SparseAdam(SparseOptimizer):
    """Lazy Adam (see the module docstring): moments and bias correction per touched row. The
    row's step count is kept in the table's dtype (exact up to 2**24 steps in float32)."""

    def __init__(
        self,
        tables: Mapping[str, nn.Module] | list[nn.Module],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.betas, self.eps = (float(betas[0]), float(betas[1])), eps
        super().__init__(tables, lr)

    def _spec(self, dim: int) -> list[tuple[str, int, float]]:
        return [("exp_avg", dim, 0.0), ("exp_avg_sq", dim, 0.0), ("step", 1, 0.0)]

    def _update(self, w: Tensor, g: Tensor, state: dict[str, Tensor]) -> None:
        b1, b2 = self.betas
        t = state["step"].add_(1)  # (U, 1)
        m = torch.lerp(state["exp_avg"], g, 1 - b1)  # (U, dim), contiguous
        v = torch.addcmul(state["exp_avg_sq"] * b2, g, g, value=1 - b2)
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)
        bc1 = 1 - torch.pow(b1, t)
        bc2_sqrt = (1 - torch.pow(b2, t)).sqrt_()
        denom = v.sqrt_().div_(bc2_sqrt).add_(self.eps)
        w.sub_(m.div_(denom).mul_(self.lr / bc1))


def _tables(model: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if is_table(m) and not any(name.startswith(k + ".") for k in out if k):
            out[name or getattr(m, "name", "table")] = m
    return out


def build_optimizers(
    model: nn.Module, cfg: OptimConfig
) -> tuple[SparseOptimizer, DenseOptimizer | None]:
    """(sparse optimizer over every table of `model`, a DenseOptimizer over the other
    parameters or None when there are none). Build it after the model is on its device."""
    tables = _tables(model)
    if cfg.sparse == "adagrad":
        rowwise = bool(getattr(cfg, "rowwise", False))  # optim.rowwise, where the config has it
        sparse: SparseOptimizer = SparseAdagrad(
            tables, cfg.lr, cfg.eps, cfg.initial_accumulator, rowwise=rowwise
        )
    elif cfg.sparse == "adam":
        sparse = SparseAdam(tables, cfg.lr, cfg.betas, cfg.eps)
    else:
        sparse = SparseSGD(tables, cfg.lr)
    dense = dense_parameters(model)
    if not dense:
        return sparse, None
    return sparse, DenseOptimizer(
        dense,
        cfg.dense,
        cfg.dense_lr,
        betas=cfg.betas,
        eps=cfg.eps,
        initial_accumulator=cfg.initial_accumulator,
    )
