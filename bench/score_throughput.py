"""Batch-scoring throughput: `ravfm.scoring.score` over a Criteo-shaped Parquet dataset.

Setup (not timed, cached under data/bench/): synthetic Criteo rows from the project's generator
converted to Parquet shards, and an FM checkpoint (k=16, 2**20 hashed rows) with random weights
(throughput does not depend on the weights). Timed: the whole `score` call on a local Ray
cluster: read, hash with the checkpoint's spec, predict in the actor pool, write Parquet.
Also timed, in this process without Ray: hashing alone and the fused FM alone, per core.

    python -m bench.score_throughput [--rows 5000000] [--actors 0] [--batch-size 65536]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from bench._common import table, write_result

__all__ = ["prepare", "main"]

ROOT = Path(__file__).resolve().parent.parent
TARGET_ROWS_PER_S = 1_000_000


def prepare(rows: int, base: Path) -> tuple[Path, Path]:
    """(shards, checkpoint) for `rows` synthetic Criteo rows, built once under `base`."""
    from ravfm.config import FeatureConfig, ModelConfig, RunConfig, to_dict
    from ravfm.data.convert import convert
    from ravfm.data.index import read_index
    from ravfm.data.schemas import SCHEMA_REVISION
    from ravfm.data.synth import synth
    from ravfm.distributed.world import World
    from ravfm.features.spec import build_spec
    from ravfm.train.checkpoint import latest_checkpoint, save_checkpoint
    from ravfm.train.setup import build_for_training

    # The shard contract's revision is in the names: a cache from an older one is not reused.
    stem = f"criteo-{rows}-r{SCHEMA_REVISION}"
    shards, ckpt = base / stem, base / f"{stem}-fm-ckpt"
    if not (shards / "_index.json").exists():
        raw = base / f"criteo-{rows}.txt"
        if not raw.exists():
            synth("criteo", rows, raw, seed=0)
        convert("criteo", str(raw), str(shards), split="test", rows_per_shard=500_000)
        raw.unlink()
    if latest_checkpoint(ckpt) is None:
        feats = FeatureConfig(hash_bits=20)
        spec_dir = base / f"spec-h20-r{SCHEMA_REVISION}"
        build_spec(read_index(shards), feats).save(spec_dir)
        cfg = RunConfig(name="score_bench", features=feats, model=ModelConfig(name="fm", k=16))
        model, _ = build_for_training(
            cfg, spec_dir, World.single("cpu"), n_train=rows, kind="sparse"
        )
        save_checkpoint(
            ckpt,
            1,
            model=model,
            sparse_opt=None,
            dense_opt=None,
            world=None,
            manifest={"epoch": 0, "config": to_dict(cfg), "task": "binary", "n_train": rows},
            spec_dir=spec_dir,
        )
    return shards, ckpt


def _per_core(shards: Path, ckpt: Path, batch: int = 65536) -> dict[str, float]:
    """rows/s of each stage of a part on one thread, best of 3: Parquet read (the columns the
    spec needs, one row group), hashing, the fused FM, FM.predict, Parquet write of predictions."""
    import io

    import pyarrow as pa

    from ravfm.data.index import split_paths
    from ravfm.features.transform import transform
    from ravfm.scorer import Scorer
    from ravfm.scoring import _columns

    torch.set_num_threads(1)
    scorer = Scorer(str(ckpt))
    path = split_paths(shards, "test")[0]
    cols = _columns(scorer.spec, [])

    def read() -> pa.Table:  # one whole row group: the unit a part is made of
        return pq.ParquetFile(path).read_row_group(0, columns=cols)

    n_read = read().num_rows
    tbl = read().slice(0, batch)
    arrays = transform(tbl, scorer.spec)
    ids, x = torch.from_numpy(arrays["ids"]), torch.from_numpy(arrays["values"])
    preds = pa.table({"prediction": pa.array(scorer.predict(ids, x)[0].numpy())})
    stages = {
        "read": read,
        "hash": lambda: transform(tbl, scorer.spec),
        "fused_fm": lambda: scorer.fused(ids, x),
        "model_forward": lambda: scorer.model.predict(ids, x),
        "write": lambda: pq.write_table(preds, io.BytesIO(), compression="zstd"),
    }
    rows = {name: n_read if name == "read" else tbl.num_rows for name in stages}
    return {name: rows[name] / min(_timed(fn) for _ in range(3)) for name, fn in stages.items()}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--actors", type=int, default=0, help="0 = sized from the cluster")
    ap.add_argument("--batch-size", type=int, default=65536)
    ap.add_argument("--data", default=str(ROOT / "data" / "bench"))
    args = ap.parse_args(argv)

    import ray

    from ravfm.connect import init_ray
    from ravfm.scoring import score

    base = Path(args.data)
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shards, ckpt = prepare(args.rows, base)
    print(f"setup {time.perf_counter() - t0:.1f} s: {shards}, {ckpt}", flush=True)
    per_core = _per_core(shards, ckpt, args.batch_size)
    init_ray(None)
    out = Path(tempfile.mkdtemp(prefix="ravfm-score-bench-"))
    shutil.rmtree(out)
    try:
        s = score(
            str(ckpt),
            str(shards),
            str(out),
            keep=[],
            batch_size=args.batch_size,
            num_actors=args.actors,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
        ray.shutdown()
    rows = [
        [
            "score, end to end (Ray Data planning, actor start, read, hash, FM, write)",
            s["rows"],
            s["seconds"],
            s["rows_per_s"],
            s["actors"],
        ],
        [
            "score, once running (first part started to last part written)",
            s["rows"],
            s["scoring_seconds"],
            s["scoring_rows_per_s"],
            s["actors"],
        ],
        [
            "Parquet read only (needed columns), 1 thread",
            None,
            None,
            per_core["read"],
            "-",
        ],
        ["hash only, 1 thread", None, None, per_core["hash"], "-"],
        ["fused FM only, 1 thread", None, None, per_core["fused_fm"], "-"],
        ["FM.predict only, 1 thread", None, None, per_core["model_forward"], "-"],
        [
            "Parquet write of predictions only, 1 thread",
            None,
            None,
            per_core["write"],
            "-",
        ],
    ]
    md = table(
        ["what", "rows", "seconds", "rows/s", "actors"],
        [[c if c is not None else "-" for c in r] for r in rows],
    )
    md += (
        f"\n\nStart-up (call to first part started): {s['startup_seconds']:.1f} s, of which "
        f"{s['startup_until_actor_spawned_seconds']:.1f} s before the actors began loading the "
        f"checkpoint (Ray Data, worker spawn, imports)."
    )
    md += (
        f"\n\nTarget: {TARGET_ROWS_PER_S:,} rows/s with 2 CPUs. End to end "
        f"{s['rows_per_s']:,.0f} ({s['rows_per_s'] / TARGET_ROWS_PER_S:.0%}); once running "
        f"{s['scoring_rows_per_s']:,.0f} ({s['scoring_rows_per_s'] / TARGET_ROWS_PER_S:.0%}). "
        f"Stages: best of 3 on one {args.batch_size:,}-row batch (read: one row group)."
    )
    print(md)
    figures = {
        "rows_per_s": s["rows_per_s"],
        "scoring_rows_per_s": s["scoring_rows_per_s"],
        "startup_seconds": s["startup_seconds"],
        "startup_until_actor_spawned_seconds": s["startup_until_actor_spawned_seconds"],
        "rows": s["rows"],
        "seconds": s["seconds"],
        "actors": s["actors"],
        "batch_size": args.batch_size,
        "target_rows_per_s": TARGET_ROWS_PER_S,
        "per_core_rows_per_s": per_core,
    }
    print(f"wrote {write_result('score_throughput', figures, md)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
