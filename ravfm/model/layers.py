"""Building blocks shared by the models: the embedding-table contract and the FM kernels.

Models never own an nn.Embedding: they ask a `TableFactory` for each table, called as
`make_table(name, num_rows, dim, init)`, where `init(w)` fills a (n, dim) tensor in place. The
returned module maps ids (...,) to rows (..., dim) and has `num_rows` and `dim` attributes; the
distributed trainer swaps `PlainTable` for a row-sharded table with the same interface. Tables
also offer `export_rows() -> (ids (n,), rows (n, dim))` and `import_rows(ids, rows)` so that
checkpoints address rows by global id.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "TableFactory",
    "Init",
    "PlainTable",
    "plain_tables",
    "pairwise",
    "pairwise_from_sums",
    "is_table",
    "dense_parameters",
    "output_range_buffer",
    "clip_output",
    "count_params",
]

Init = Callable[[Tensor], None]
TableFactory = Callable[[str, int, int, Init], nn.Module]


class PlainTable(nn.Module):
    """A dense (N, dim) parameter with an index_select gather; dense gradients.

    Used in tests, on a single process, and with any torch.optim optimizer.
    """

    def __init__(
        self, name: str, num_rows: int, dim: int, init: Init, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.name, self.num_rows, self.dim = name, int(num_rows), int(dim)
        self.weight = nn.Parameter(torch.empty(self.num_rows, self.dim, dtype=dtype))
        with torch.no_grad():
            init(self.weight.data)

    def forward(self, ids: Tensor) -> Tensor:
        """ids: (...,) int64 -> rows (..., dim)."""
        flat = self.weight.index_select(0, ids.reshape(-1))  # (n, dim)
        return flat.reshape(*ids.shape, self.dim)

    def export_rows(self) -> tuple[Tensor, Tensor]:
        """Every row with its global id: ids (N,) int64, rows (N, dim)."""
        ids = torch.arange(self.num_rows, dtype=torch.int64, device=self.weight.device)
        return ids, self.weight.detach()

    @torch.no_grad()
    def import_rows(self, ids: Tensor, rows: Tensor) -> None:
        """Overwrite rows `ids` (n,) with `rows` (n, dim)."""
        ids = ids.to(self.weight.device, torch.int64)
        self.weight.index_copy_(0, ids, rows.to(self.weight.device, self.weight.dtype))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_rows={self.num_rows}, dim={self.dim}"


def plain_tables(dtype: torch.dtype = torch.float32) -> TableFactory:
    """A TableFactory that makes `PlainTable`s of `dtype`."""

    def make(name: str, num_rows: int, dim: int, init: Init) -> nn.Module:
        return PlainTable(name, num_rows, dim, init, dtype=dtype)

    return make


def pairwise(u: Tensor) -> Tensor:
    """Sum over i<j of <u_i, u_j> (Rendle 2010, eq. 5), u = x_i v_i: (..., B, F, K) -> (..., B)."""
    return pairwise_from_sums(u.sum(dim=-2), (u * u).sum(dim=(-2, -1)))


def pairwise_from_sums(s: Tensor, q: Tensor) -> Tensor:
    """The square-of-sum identity: s = sum_i u_i (..., K), q = sum_i |u_i|^2 (...) -> (...)."""
    return 0.5 * ((s * s).sum(dim=-1) - q)


def is_table(module: nn.Module) -> bool:
    """True for an embedding-table module (anything exporting rows by global id)."""
    return hasattr(module, "export_rows") and hasattr(module, "num_rows") and hasattr(module, "dim")


def output_range_buffer(module: nn.Module) -> None:
    """Register `output_range` (2,): predictions are clipped to [lo, hi] (ratings: the train
    targets' range, as libFM does); (-inf, inf) leaves them as they are. Saved in checkpoints."""
    module.register_buffer("output_range", torch.tensor([-math.inf, math.inf]))


def clip_output(raw: Tensor, output_range: Tensor) -> Tensor:
    """raw (...) clipped to output_range (2,) = [lo, hi]."""
    return raw.clamp(output_range[0].to(raw.dtype), output_range[1].to(raw.dtype))


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters outside every embedding table (bias, VFM priors, ...)."""
    in_tables = {id(p) for m in model.modules() if is_table(m) for p in m.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in in_tables]


def count_params(model: nn.Module) -> int:
    """Allocated table rows x dim (all ranks together) plus every dense parameter."""
    total, table_params = 0, set()
    for m in model.modules():
        if m is not model and is_table(m):
            total += int(m.num_rows) * int(m.dim)
            table_params.update(id(p) for p in m.parameters())
    return total + sum(p.numel() for p in model.parameters() if id(p) not in table_params)
