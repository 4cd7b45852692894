"""The full Ray pipeline (Parquet -> Polars hashing -> Ray Train worker) against the bare step.

Same run, same process: the bare step (in-memory batches, one process) is timed first, then
`ravfm train` on synthetic Criteo-shaped shards with 1 worker and with 2 workers (rows
sharding). Pipeline samples/s is the training epoch's samples over its wall time (streaming,
hashing and the optimizer together; evaluation excluded), best of the epochs. Results merge
into bench/results/train_throughput.json (keys pipeline_sps, pipeline_ratio, two_workers_ratio).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from bench._common import table
from bench.train_throughput import bare_step_sps, criteo_like_batches, merge_result

__all__ = ["pipeline_sps", "main"]


def pipeline_sps(
    shards: Path,
    runs: Path,
    workers: int,
    *,
    epochs: int,
    k: int,
    batch: int,
    hash_bits: int,
    sharding: str,
) -> tuple[float, float]:
    """(steady samples/s from an epoch's first batch to its end, wall samples/s of the whole
    epoch including the stream's start-up), best epoch of each, for `ravfm train`."""
    from ravfm.config import load_config
    from ravfm.driver import train

    cfg = load_config(None, [
        f"name=pipe-w{workers}-{sharding}", f"runs_dir={runs}", "data.dataset=criteo",
        f"data.shards={shards}", f"features.hash_bits={hash_bits}", f"model.k={k}",
        f"train.epochs={epochs}", f"train.batch_size={batch}", f"train.num_workers={workers}",
        f"embedding.sharding={sharding}", "train.log_every=1000000", "train.shuffle_buffer=0",
        "train.keep_checkpoints=1",
    ])  # fmt: skip
    epochs_ = train(cfg)["epochs"]
    steady = max(e["train"]["n"] / (e["seconds"] - e["first_batch_seconds"]) for e in epochs_)
    wall = max(e["train"]["n"] / e["seconds"] for e in epochs_)
    return steady, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000, help="synthetic Criteo rows")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--hash-bits", type=int, default=20)
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    args = p.parse_args(argv)

    import ray

    from ravfm.data.convert import convert
    from ravfm.data.synth import synth

    work = Path(tempfile.mkdtemp(prefix="ravfm-bench-pipe-"))
    common = {"epochs": args.epochs, "k": args.k, "batch": args.batch, "hash_bits": args.hash_bits}
    try:
        raw = synth("criteo", args.rows, str(work / "raw.txt"), seed=0)
        convert("criteo", str(raw), str(work / "shards"), rows_per_shard=250_000)
        # The bare step twice: on one thread, as the pipeline's worker trains (driver.plan_workers
        # gives it its own CPU; Ray Data's tasks hash on the other), and on both cores.
        batches = criteo_like_batches(4, batch_size=args.batch, num_rows=2**args.hash_bits)
        bare_by_threads = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            bare_by_threads[threads] = bare_step_sps(  # the step `ravfm train` runs: FM
                batches, k=args.k, num_rows=2**args.hash_bits, steps=8, use_bag=True
            )  # terms from table.bag, element-wise sparse Adagrad (the config's defaults)
        bare, bare2 = bare_by_threads[1], bare_by_threads[2]
        one, one_wall = pipeline_sps(
            work / "shards", work / "runs", 1, sharding="replicated", **common
        )
        ray.shutdown()
        two, two_wall = pipeline_sps(work / "shards", work / "runs", 2, sharding="rows", **common)
        ray.shutdown()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = [
        ["bare step (in-memory batches, 1 process, 1 thread)", bare, "", 1.0],
        ["bare step (in-memory batches, 1 process, 2 threads)", bare2, "", bare2 / bare],
        ["Ray pipeline, 1 worker (Parquet, hashing, training)", one, one_wall, one / bare],
        ["Ray pipeline, 2 workers, rows sharding", two, two_wall, two / bare],
    ]
    md = (
        f"FM k={args.k}, synthetic Criteo {args.rows:,} rows (80% train), batch {args.batch}, "
        f"2**{args.hash_bits} rows; best epoch of {args.epochs}\n\n"
        + table(["path", "samples/s (steady)", "samples/s (epoch wall)", "x bare (steady)"], rows)
        + f"\n\npipeline_ratio = 1 worker / bare step on both cores: {one / bare2:.2f}x steady, "
        f"{one_wall / bare2:.2f}x epoch wall (target 0.7x). 2 workers / 1 worker: "
        f"{two / one:.2f}x. Steady counts from an epoch's first batch to its end; epoch wall "
        "adds the stream's start-up (the first row group read and hashed)."
    )
    print(md)
    merge_result("train_throughput", {
        "pipeline_sps": one, "pipeline_ratio": one / bare2, "pipeline_bare_sps": bare2,
        "pipeline_ratio_basis": "bare step on both cores (2 threads); the worker itself trains "
        "on 1 thread beside Ray Data's ingest", "pipeline_bare_1thread_sps": bare,
        "pipeline_ratio_vs_1thread": one / bare, "pipeline_wall_ratio": one_wall / bare2,
        "pipeline_wall_sps": one_wall, "two_workers_sps": two, "two_workers_wall_sps": two_wall,
        "two_workers_ratio": two / one, "pipeline_rows": args.rows,
    }, md, "pipeline")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
