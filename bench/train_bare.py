"""ravfm's own training step on rows already hashed and held in memory (no reading, hashing,
batching, metrics or checkpoints): forward, backward, sparse and dense optimizer steps.

    python -m bench.train_bare --config jobs/criteo_fm.yaml --spec SPEC_DIR --shards SHARDS \
        [--threads 2] [override ...]

Uses the job's table (the spec's compact rows, after min_count), model, optimizer and batch
size, over every train row once in a seeded order. Prints one JSON line: samples_per_s, steps,
threads, batch_size. `make bench-e2e` reports it as ravfm_bare_sps beside `ravfm train`.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np

__all__ = ["main", "bare_sps"]


def bare_sps(config: str, spec_dir: str, shards: str, threads: int, overrides: list[str]) -> dict:
    import torch

    from ravfm.batch import from_numpy
    from ravfm.config import load_config
    from ravfm.data.index import read_index
    from ravfm.distributed.optim import build_optimizers
    from ravfm.distributed.world import World
    from ravfm.driver import with_task
    from ravfm.features.spec import FeatureSpec
    from ravfm.features.stream import split_groups, thread_blocks
    from ravfm.train.setup import build_for_training
    from ravfm.train.step import Position, Trainer

    torch.set_num_threads(threads)
    cfg = load_config(config, overrides)
    spec = FeatureSpec.load(spec_dir)
    groups = split_groups(shards, read_index(shards), "train", spec)
    blocks = list(thread_blocks(groups, spec, threads, with_rows=False))
    rows = {k: np.concatenate([b[k] for b in blocks]) for k in ("ids", "values", "label")}
    n, bs = len(rows["label"]), cfg.train.batch_size
    order = np.random.default_rng(cfg.seed).permutation(n)
    batches = [
        from_numpy({k: v[order[i : i + bs]] for k, v in rows.items()}) for i in range(0, n, bs)
    ]
    del blocks, rows
    torch.manual_seed(cfg.seed)
    world = World.single()
    cfg = with_task(cfg, spec)
    model, _ = build_for_training(cfg, spec_dir, world, n_train=n)
    sparse, dense = build_optimizers(model, cfg.optim)
    trainer = Trainer(model, sparse, dense, world, task=cfg.task, optim=cfg.optim,
                      num_fields=spec.num_fields)  # fmt: skip
    pos = Position(track_rows=False)
    for b in batches[:3]:  # warm-up: first calls of every kernel
        trainer.step(b, pos)
    gc.freeze()
    t0 = time.perf_counter()
    for b in batches:
        trainer.step(b, pos)
    seconds = time.perf_counter() - t0
    return {"samples_per_s": n / seconds, "steps": len(batches), "rows": n, "threads": threads,
            "batch_size": bs, "seconds": seconds}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    out = bare_sps(a.config, a.spec, a.shards, a.threads, a.overrides)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
