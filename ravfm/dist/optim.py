"""Row-wise sparse optimizers for embedding tables, and `build_optimizers`.

Each optimizer steps every table of a model in one fused pass over the touched rows: gather the
rows' state, update it and the weights in place, write both back with index_copy_. Untouched rows
are neither read nor written (their bits do not change), and nothing walks the whole table.

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
from ravfm.dist.embedding import LocalRows, SparseGrad
from ravfm.model.layers import is_table

__all__ = ["SparseOptimizer", "SparseSGD", "SparseAdagrad", "SparseAdam", "build_optimizers"]


class _DenseRows:
    """A table whose weight is a dense nn.Parameter (PlainTable) seen as rows: touched rows are
    those with a nonzero gradient (a dense pass: PlainTable is the slow reference)."""

    def __init__(self, table: nn.Module) -> None:
        self.table, self.name = table, getattr(table, "name", "table")

    @property
    def weight(self) -> Tensor:
        return self.table.weight.data

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


class SparseOptimizer:
    """Steps the touched rows of every table. tables: {key: table} (keys name the state in
    checkpoints) or a list of tables (keyed by their names). `lr` may be changed between steps."""

    def __init__(self, tables: Mapping[str, nn.Module] | list[nn.Module], lr: float) -> None:
        if not isinstance(tables, Mapping):
            tables = {getattr(t, "name", f"table{i}"): t for i, t in enumerate(tables)}
        self.tables = {k: _rows_view(t) for k, t in tables.items()}
        self.lr = float(lr)
        self.state: dict[str, dict[str, Tensor]] = {
            k: self._new_state(t.weight) for k, t in self.tables.items()
        }

    def _new_state(self, weight: Tensor) -> dict[str, Tensor]:
        """Per-row state tensors (L, ...) for a table of weight (L, dim)."""
        return {}

    def _update(self, weight_rows: Tensor, g: SparseGrad, state: dict[str, Tensor]) -> None:
        """Update weight_rows (U, dim) in place (and the state's rows g.rows)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self) -> None:
        """Apply and clear the gradients every table collected since the last step."""
        for key, t in self.tables.items():
            g = t.sparse_grad()
            t.zero_grad()
            if g is None or g.rows.numel() == 0:
                continue
            w = t.weight
            rows = g.current if g.current is not None else w.index_select(0, g.rows)
            self._update(rows, g, self.state[key])
            w.index_copy_(0, g.rows, rows)

    def zero_grad(self) -> None:
        for t in self.tables.values():
            t.zero_grad()

    def export_state(self) -> dict[str, Tensor]:
        """{key/ids: global row ids (n,), key/NAME: state rows (n, ...)} for the rows each table
        exports on this rank."""
        out: dict[str, Tensor] = {}
        for key, t in self.tables.items():
            if not self.state[key]:
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
            for name, s in self.state[key].items():
                s.index_copy_(0, local, state[f"{key}/{name}"].to(s)[mask])


class SparseSGD(SparseOptimizer):
    """w -= lr g on the touched rows."""

    def _update(self, weight_rows: Tensor, g: SparseGrad, state: dict[str, Tensor]) -> None:
        weight_rows.add_(g.grad, alpha=-self.lr)


class SparseAdagrad(SparseOptimizer):
    """Adagrad on the touched rows: element-wise accumulators (as torch.optim.Adagrad), or one
    per row with rowwise=True (memory N instead of N x dim)."""

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

    def _new_state(self, weight: Tensor) -> dict[str, Tensor]:
        shape = weight.shape[:1] if self.rowwise else weight.shape
        return {"sum": torch.full(shape, self.initial, dtype=weight.dtype, device=weight.device)}

    def _update(self, weight_rows: Tensor, g: SparseGrad, state: dict[str, Tensor]) -> None:
        acc = state["sum"]
        s = acc.index_select(0, g.rows)  # (U, dim) or (U,)
        if self.rowwise:
            s.add_(g.grad.square().mean(dim=1))
        else:
            s.addcmul_(g.grad, g.grad)
        acc.index_copy_(0, g.rows, s)
        std = s.sqrt_().add_(self.eps)
        weight_rows.addcdiv_(g.grad, std.unsqueeze(1) if self.rowwise else std, value=-self.lr)


class SparseAdam(SparseOptimizer):
    """Lazy Adam (see the module docstring): moments and bias correction per touched row."""

    def __init__(
        self,
        tables: Mapping[str, nn.Module] | list[nn.Module],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.betas, self.eps = (float(betas[0]), float(betas[1])), eps
        super().__init__(tables, lr)

    def _new_state(self, weight: Tensor) -> dict[str, Tensor]:
        n = weight.shape[0]
        return {
            "exp_avg": torch.zeros_like(weight),
            "exp_avg_sq": torch.zeros_like(weight),
            "step": torch.zeros(n, dtype=torch.int32, device=weight.device),
        }

    def _update(self, weight_rows: Tensor, g: SparseGrad, state: dict[str, Tensor]) -> None:
        b1, b2 = self.betas
        t = state["step"].index_select(0, g.rows).add_(1)  # (U,)
        state["step"].index_copy_(0, g.rows, t)
        m = state["exp_avg"].index_select(0, g.rows).lerp_(g.grad, 1 - b1)  # (U, dim)
        v = state["exp_avg_sq"].index_select(0, g.rows).mul_(b2)
        v.addcmul_(g.grad, g.grad, value=1 - b2)
        state["exp_avg"].index_copy_(0, g.rows, m)
        state["exp_avg_sq"].index_copy_(0, g.rows, v)
        tf = t.to(weight_rows.dtype).unsqueeze(1)  # (U, 1)
        bc1 = 1 - torch.pow(b1, tf)
        bc2_sqrt = (1 - torch.pow(b2, tf)).sqrt_()
        denom = v.sqrt().div_(bc2_sqrt).add_(self.eps)
        weight_rows.sub_(m.div_(denom).mul_(self.lr / bc1))


def _tables(model: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if is_table(m) and not any(name.startswith(k + ".") for k in out if k):
            out[name or getattr(m, "name", "table")] = m
    return out


def build_optimizers(
    model: nn.Module, cfg: OptimConfig
) -> tuple[SparseOptimizer, torch.optim.Optimizer | None]:
    """(sparse optimizer over every table of `model`, torch.optim over the other parameters or
    None when there are none). Build it after the model is on its device and dtype."""
    tables = _tables(model)
    if cfg.sparse == "adagrad":
        sparse: SparseOptimizer = SparseAdagrad(tables, cfg.lr, cfg.eps, cfg.initial_accumulator)
    elif cfg.sparse == "adam":
        sparse = SparseAdam(tables, cfg.lr, cfg.betas, cfg.eps)
    else:
        sparse = SparseSGD(tables, cfg.lr)
    in_tables = {id(p) for t in tables.values() for p in t.parameters()}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in in_tables]
    if not dense:
        return sparse, None
    if cfg.dense == "adam":
        return sparse, torch.optim.Adam(dense, lr=cfg.dense_lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.dense == "adagrad":
        return sparse, torch.optim.Adagrad(
            dense, lr=cfg.dense_lr, eps=cfg.eps, initial_accumulator_value=cfg.initial_accumulator
        )
    return sparse, torch.optim.SGD(dense, lr=cfg.dense_lr)
