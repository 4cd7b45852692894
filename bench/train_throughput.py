"""Training throughput: the bare step (one process, in-memory batches) against a plain PyTorch FM.

FM k=16 on Criteo-shaped batches (39 fields, Zipf-distributed ids over a 2**20-row table, batch
8192), 2 threads. Baseline: nn.Embedding(sparse=True) + torch.optim.SparseAdam (+ Adam for the
bias). Bare step: ravfm.model.fm.FM on a SparseTable + fused SparseAdagrad (+ Adam for the bias):
forward, backward and update. Both are timed in the same run, interleaved, and the ratio is what
counts (the machine is shared). Also: per-rank memory of a RowShardedTable with W = 2.

    python -m bench.train_throughput [--steps 20] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench._common import RESULTS, table, write_result
from ravfm.batch import Batch
from ravfm.config import OptimConfig
from ravfm.dist.embedding import RowShardedTable, table_factory
from ravfm.dist.optim import SparseAdagrad, build_optimizers
from ravfm.dist.world import World
from ravfm.model.fm import FM, fm_init
from ravfm.model.losses import data_loss

__all__ = [
    "criteo_like_batches",
    "baseline_sps",
    "bare_step_sps",
    "sharded_memory",
    "merge_result",
    "main",
]

NUM_ROWS, FIELDS, BATCH, K = 2**20, 39, 8192, 16


def criteo_like_batches(
    n: int, batch_size: int = BATCH, fields: int = FIELDS, num_rows: int = NUM_ROWS, seed: int = 0
) -> list[Batch]:
    """n Batches: ids (B, F) Zipf(1.2) ranks per field hashed into [1, num_rows), values 1.0
    (Criteo after binning), labels ~25% positive."""
    rng = np.random.default_rng(seed)
    mix = rng.integers(1, 2**31, size=fields, dtype=np.int64) | 1  # per-field odd multiplier
    out = []
    for _ in range(n):
        rank = np.minimum(rng.zipf(1.2, size=(batch_size, fields)), 1 << 40).astype(np.int64)
        ids = (rank * mix + np.arange(fields)) % (num_rows - 1) + 1  # row 0 is padding
        label = (rng.random(batch_size) < 0.25).astype(np.float32)
        out.append(
            Batch(torch.from_numpy(ids), torch.ones(batch_size, fields), torch.from_numpy(label))
        )
    return out


class _BaselineFM(nn.Module):
    """Plain PyTorch FM: nn.Embedding(sparse=True) of [w, v] rows, square-of-sum pairwise."""

    def __init__(self, num_rows: int, k: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(num_rows, k + 1, sparse=True)
        with torch.no_grad():
            fm_init(self.emb.weight, 0.01)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) * values.unsqueeze(-1)  # (B, F, K+1)
        v = x[..., 1:]
        s = v.sum(dim=1)  # (B, K)
        return self.bias + x[..., 0].sum(1) + 0.5 * ((s * s).sum(1) - (v * v).sum((1, 2)))


class _BagFM(FM):
    """ravfm's FM with its terms from table.bag: the change proposed for ravfm.model.fm (same
    outputs; the (B, F, K+1) rows are never built)."""

    def forward(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        sums, sq = self.table.bag(ids, values, squares=True)  # (B, K+1) each
        s = sums[:, 1:]
        return self.bias + sums[:, 0] + 0.5 * ((s * s).sum(1) - sq[:, 1:].sum(1))

    def loss(self, batch: Batch, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.forward(batch.ids, batch.values)
        return data_loss(raw, batch.label, task), raw


def _timed(step: Callable[[Batch], None], batches: list[Batch], steps: int) -> float:
    """Samples/s of `steps` calls (after one warm-up call) cycling over `batches`."""
    step(batches[0])
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return steps * len(batches[0]) / (time.perf_counter() - start)


def _baseline_step(num_rows: int, k: int, device: str) -> Callable[[Batch], None]:
    model = _BaselineFM(num_rows, k).to(device)
    sparse = torch.optim.SparseAdam(list(model.emb.parameters()), lr=1e-3)
    dense = torch.optim.Adam([model.bias], lr=1e-3)

    def step(b: Batch) -> None:
        sparse.zero_grad()
        dense.zero_grad()
        F.binary_cross_entropy_with_logits(model(b.ids, b.values), b.label).backward()
        sparse.step()
        dense.step()

    return step


def _bare_step(
    num_rows: int, k: int, device: str, sparse: str, rowwise: bool, use_bag: bool = False
) -> Callable[[Batch], None]:
    cls = _BagFM if use_bag else FM
    model = cls(
        num_rows, k, make_table=table_factory("sparse", World.single(device), device=device)
    ).to(device)
    opt, dense = build_optimizers(model, OptimConfig(sparse=sparse, lr=0.05))
    if rowwise:
        opt = SparseAdagrad({"table": model.table}, lr=0.05, rowwise=True)

    def step(b: Batch) -> None:
        dense.zero_grad()
        loss, _ = model.loss(b, "binary")
        loss.backward()
        opt.step()
        dense.step()

    return step


def _on(batches: list[Batch], device: str) -> list[Batch]:
    return [b.to(device) for b in batches]


def baseline_sps(
    batches: list[Batch],
    *,
    k: int = K,
    num_rows: int = NUM_ROWS,
    steps: int = 10,
    device: str = "cpu",
) -> float:
    """Samples/s of the plain PyTorch FM (nn.Embedding(sparse=True) + SparseAdam)."""
    return _timed(_baseline_step(num_rows, k, device), _on(batches, device), steps)


def bare_step_sps(
    batches: list[Batch],
    *,
    k: int = K,
    num_rows: int = NUM_ROWS,
    steps: int = 10,
    device: str = "cpu",
    sparse: str = "adagrad",
    rowwise: bool = False,
    use_bag: bool = False,
) -> float:
    """Samples/s of ravfm's bare step: FM on a SparseTable + fused sparse optimizer (use_bag:
    the FM computes its terms with table.bag)."""
    step = _bare_step(num_rows, k, device, sparse, rowwise, use_bag)
    return _timed(step, _on(batches, device), steps)


def sharded_memory(num_rows: int = NUM_ROWS, dim: int = K + 1, world_size: int = 2) -> dict:
    """Per-rank bytes of a RowShardedTable and its Adagrad state (built for rank 0 of W)."""
    world = World(0, world_size, torch.device("cpu"), None)
    t = RowShardedTable("fm", num_rows, dim, lambda w: w.normal_(0, 0.01), world)
    opt = SparseAdagrad([t])
    table_bytes = num_rows * dim * 4
    weight = t.weight.numel() * t.weight.element_size()
    state = sum(s.numel() * s.element_size() for s in opt.state["fm"].values())
    return {
        "table_bytes": table_bytes,
        "rank_weight_bytes": weight,
        "rank_state_bytes": state,
        "rank_weight_over_share": weight / (table_bytes / world_size),
    }


def merge_result(name: str, figures: dict, markdown: str, section: str) -> None:
    """Update bench/results/NAME.json: keep other keys and other sections' tables."""
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    keep = {
        k: v for k, v in old.items() if k not in ("name", "when", "machine", "versions", "table")
    }
    sections = {**keep.pop("sections", {}), section: markdown}
    merged = {**keep, **figures, "sections": sections}
    write_result(name, merged, "\n\n".join(sections.values()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = criteo_like_batches(4)
    runs: dict[str, list[float]] = {"baseline": [], "bare": [], "bare_rowwise": [], "bare_adam": []}
    for _ in range(args.rounds):
        runs["baseline"].append(baseline_sps(batches, steps=args.steps, device=args.device))
        runs["bare"].append(bare_step_sps(batches, steps=args.steps, device=args.device))
        runs["bare_rowwise"].append(
            bare_step_sps(batches, steps=args.steps, device=args.device, rowwise=True)
        )
        runs["bare_adam"].append(
            bare_step_sps(batches, steps=args.steps, device=args.device, sparse="adam")
        )
    med = {k: statistics.median(v) for k, v in runs.items()}
    mem = sharded_memory()
    rows = [
        ["baseline: nn.Embedding(sparse) + SparseAdam", med["baseline"], 1.0],
        ["bare: FM on SparseTable + SparseAdagrad", med["bare"], med["bare"] / med["baseline"]],
        ["bare, row-wise Adagrad", med["bare_rowwise"], med["bare_rowwise"] / med["baseline"]],
        ["bare, lazy SparseAdam", med["bare_adam"], med["bare_adam"] / med["baseline"]],
    ]
    md = (
        f"FM k={K}, {FIELDS} fields, Zipf ids over {NUM_ROWS:,} rows, batch {BATCH}, "
        f"{args.threads} threads, {args.device}; median of {args.rounds} interleaved rounds of "
        f"{args.steps} steps\n\n"
        + table(["step", "samples/s", "x baseline"], rows)
        + "\n\n"
        + table(
            ["RowShardedTable W=2, per rank", "MiB"],
            [
                ["table / W", mem["table_bytes"] / 2 / 2**20],
                ["weight held", mem["rank_weight_bytes"] / 2**20],
                ["Adagrad state", mem["rank_state_bytes"] / 2**20],
            ],
        )
    )
    print(md)
    merge_result(
        "train_throughput",
        {
            "baseline_sps": med["baseline"],
            "bare_sps": med["bare"],
            "bare_ratio": med["bare"] / med["baseline"],
            "bare_rowwise_sps": med["bare_rowwise"],
            "bare_adam_sps": med["bare_adam"],
            "bare_runs": runs,
            "threads": args.threads,
            "device": args.device,
            "rows_w2_memory": mem,
        },
        md,
        "bare",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
