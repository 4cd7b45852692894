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
import ctypes
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench._common import RESULTS, table, write_result
from ravfm.batch import Batch
from ravfm.config import OptimConfig
from ravfm.distributed.dense import all_reduce_dense_grads
from ravfm.distributed.embedding import table_factory
from ravfm.distributed.optim import SparseAdagrad, build_optimizers
from ravfm.distributed.world import World, free_port
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
        sums, nsq = self.table.bag(ids, values, norms=((1, self.k + 1),))  # (B, K+1), (B, 1)
        s = sums[:, 1:]
        return self.bias + sums[:, 0] + 0.5 * ((s * s).sum(1) - nsq[:, 0])

    def loss(self, batch: Batch, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.forward(batch.ids, batch.values)
        return data_loss(raw, batch.label, task), raw


def _measure(
    step: Callable[[Batch], None], batches: list[Batch], steps: int
) -> tuple[float, float]:
    """(samples per wall second, samples per process CPU second) of `steps` calls of `step`
    cycling over `batches`, after one warm-up call."""
    step(batches[0])
    if batches[0].ids.is_cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(batches[i % len(batches)])
    if batches[0].ids.is_cuda:
        torch.cuda.synchronize()
    n = steps * len(batches[0])
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def _timed(step: Callable[[Batch], None], batches: list[Batch], steps: int) -> float:
    return _measure(step, batches, steps)[0]


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


def _rss(field: str = "VmRSS") -> int:
    """Bytes of this process's resident set (VmRSS) or its peak since the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS counts live bytes only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    except OSError:
        pass


def _memory_rank(rank: int, port: int, out: str, steps: int) -> None:
    """One of two gloo ranks: RSS growth from building a RowShardedTable FM + Adagrad, and the
    peak growth while training on half batches (rank 0 writes the figures to `out`)."""
    torch.set_num_threads(1)
    world = World.init(rank, 2, f"tcp://127.0.0.1:{port}")
    batches = criteo_like_batches(steps, batch_size=BATCH // 2, seed=rank)
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])  # torch.optim imports torch._dynamo once
    _trim()
    before = _rss()
    model = _BagFM(NUM_ROWS, K, make_table=table_factory("rows", world))
    opt, dense = build_optimizers(model, OptimConfig())
    _trim()
    built = _rss()
    _reset_peak()
    for b in batches:
        dense.zero_grad()
        model.loss(b, "binary")[0].backward()
        all_reduce_dense_grads(model, world)
        opt.step()
        dense.step()
    peak = _rss("VmHWM")
    if rank == 0:
        storage = model.table.storage
        figures = {
            "table_bytes": NUM_ROWS * (K + 1) * 4,
            "rank_weight_bytes": model.table.weight.numel() * 4,
            "rank_state_bytes": (storage.shape[1] - K - 1) * storage.shape[0] * 4,
            "rank_built_rss_bytes": built - before,
            "rank_step_peak_extra_bytes": max(0, peak - built),
        }
        Path(out).write_text(json.dumps(figures))
    world.barrier()
    torch.distributed.destroy_process_group()


def sharded_memory(steps: int = 3) -> dict:
    """Per-rank memory of FM k=16 on a RowShardedTable (2**20 rows) + Adagrad with W = 2,
    measured in two gloo processes: RSS after building, peak extra RSS while training."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "memory.json")
        torch.multiprocessing.spawn(_memory_rank, args=(free_port(), out, steps), nprocs=2)
        return json.loads(Path(out).read_text())


def merge_result(name: str, figures: dict, markdown: str, section: str) -> None:
    """Update bench/results/NAME.json with one section's figures and table: the keys this
    section wrote last time are replaced, other sections' keys and tables are kept."""
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    owners = old.pop("section_keys", {})
    stale = set(owners.get(section, ())) | {"name", "when", "machine", "versions", "table"}
    keep = {k: v for k, v in old.items() if k not in stale}
    sections = {**keep.pop("sections", {}), section: markdown}
    owners[section] = sorted(figures)
    merged = {**keep, **figures, "sections": sections, "section_keys": owners}
    write_result(name, merged, "\n\n".join(sections.values()))


VARIANTS = {  # name: (label, bare_step_sps options or None for the baseline)
    "baseline": ("baseline: nn.Embedding(sparse) + SparseAdam", None),
    "bare": ("bare: ravfm FM on SparseTable + SparseAdagrad", {}),
    "bare_bag": ("bare, FM terms from table.bag", {"use_bag": True}),
    "bare_bag_rowwise": ("bare, table.bag + row-wise Adagrad", {"use_bag": True, "rowwise": True}),
    "bare_bag_adam": ("bare, table.bag + lazy SparseAdam", {"use_bag": True, "sparse": "adam"}),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds (medians reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the W=2 memory measurement")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = _on(criteo_like_batches(4), args.device)
    wall: dict[str, list[float]] = {k: [] for k in VARIANTS}
    cpu: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(args.rounds):
        for name, (_, opts) in VARIANTS.items():
            if opts is None:
                step = _baseline_step(NUM_ROWS, K, args.device)
            else:
                step = _bare_step(
                    NUM_ROWS,
                    K,
                    args.device,
                    opts.get("sparse", "adagrad"),
                    opts.get("rowwise", False),
                    opts.get("use_bag", False),
                )
            w, c = _measure(step, batches, args.steps)
            wall[name].append(w)
            cpu[name].append(c)
    # the machine is shared: a ratio is taken within a round (variants run back to back), and
    # the median over rounds is reported; "best" is each variant's fastest round
    ratio = {k: statistics.median(w / b for w, b in zip(wall[k], wall["baseline"])) for k in wall}
    cpu_ratio = {k: statistics.median(c / b for c, b in zip(cpu[k], cpu["baseline"])) for k in cpu}
    med = {k: statistics.median(v) for k, v in wall.items()}
    rows = [
        [label, med[k], max(wall[k]), ratio[k], cpu_ratio[k]] for k, (label, _) in VARIANTS.items()
    ]
    md = (
        f"FM k={K}, {FIELDS} fields, Zipf ids over {NUM_ROWS:,} rows, batch {BATCH}, "
        f"{args.threads} threads, {args.device}; {args.rounds} rounds of {args.steps} steps, the "
        "variants back to back in each round; ratios are medians of the per-round ratios; "
        "CPU ratios use process CPU time (less sensitive to other load on a shared machine)\n\n"
        + table(
            [
                "step",
                "samples/s (median)",
                "samples/s (best)",
                "x baseline",
                "x baseline (CPU time)",
            ],
            rows,
        )
    )
    figures = {
        "baseline_sps": med["baseline"],
        "bare_sps": med["bare"],
        "bare_ratio": ratio["bare"],
        "bare_bag_sps": med["bare_bag"],
        "bare_bag_ratio": ratio["bare_bag"],
        "bare_cpu_ratio": cpu_ratio["bare"],
        "bare_bag_cpu_ratio": cpu_ratio["bare_bag"],
        "variant_ratios": ratio,
        "bare_runs": {"wall_sps": wall, "cpu_sps": cpu},
        "threads": args.threads,
        "device": args.device,
    }
    if not args.no_memory:
        mem = sharded_memory()
        mib = 2**20
        md += "\n\n" + table(
            ["RowShardedTable W=2 (FM k=16, 2**20 rows, Adagrad), per rank", "MiB"],
            [
                ["table / W", mem["table_bytes"] / 2 / mib],
                ["weights held", mem["rank_weight_bytes"] / mib],
                ["Adagrad state (packed beside the weights)", mem["rank_state_bytes"] / mib],
                ["RSS growth when built", mem["rank_built_rss_bytes"] / mib],
                [
                    "extra peak RSS while training (batch 4096 per rank)",
                    mem["rank_step_peak_extra_bytes"] / mib,
                ],
            ],
        )
        figures["rows_w2_memory"] = mem
    print(md)
    merge_result("train_throughput", figures, md, "bare")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
