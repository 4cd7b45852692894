"""`ravfm score`: batch predictions for any Parquet dataset (or raw file) with a checkpoint.

The input is cut into parts (runs of whole Parquet row groups, in input order); Ray Data hands
the parts to a pool of actors (GPU actors when the cluster has GPUs) that each load the
checkpoint once, then read a part batch by batch, hash it with the checkpoint's own feature
spec, predict, and write one output file per part. So every input row gives exactly one output
row, in input order, by construction: no shuffle or merge can reorder them. Output columns: the
kept ones, `prediction` (click probability for binary tasks, the rating for regression) and,
for VFM, `prediction_std`.

The model side (checkpoint loading, the fused FM path, predictions per batch) is in
`ravfm.scorer`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ravfm.errors import UserError
from ravfm.scorer import PREDICTION, PREDICTION_STD, FusedFM, Scorer

__all__ = ["score", "Scorer", "FusedFM", "resolve_input", "PREDICTION", "PREDICTION_STD"]


def _fs(path: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(path)


def _join(fs: Any, base: str, name: str, like: str) -> str:
    p = base.rstrip("/") + "/" + name
    return p if "://" not in like else fs.unstrip_protocol(p)


def resolve_input(src: str, dataset: str, tmp_root: Path) -> tuple[list[str], bool]:
    """Parquet paths to score, in order, and whether they were converted into `tmp_root`.

    src: a shard directory with _index.json (all its shards, index order), a Parquet file, a
    directory of Parquet files (sorted by name), or a raw file of the checkpoint's dataset
    format, which is converted first (one split, input order kept).
    """
    from ravfm.data.index import INDEX_NAME, read_index

    fs, p = _fs(src)
    if fs.isdir(p) and fs.exists(p.rstrip("/") + "/" + INDEX_NAME):
        index = read_index(src)
        if index.get("dataset") != dataset:
            raise UserError(
                f"feature spec mismatch: dataset {index.get('dataset')} != {dataset}; "
                f"{src} holds {index.get('dataset')} shards but the checkpoint "
                f"was trained on {dataset}"
            )
        return [_join(fs, p, s["path"], src) for s in index["shards"]], False
    if fs.isdir(p) and dataset != "movielens":
        files = sorted(f for f in fs.find(p) if f.endswith(".parquet"))
        if not files:
            raise UserError(
                f"--input {src} is a directory without .parquet files or _index.json; "
                "pass Parquet data, shards from `ravfm convert`, or a raw file"
            )
        return [f if "://" not in src else fs.unstrip_protocol(f) for f in files], False
    if p.endswith(".parquet"):
        if not fs.exists(p):
            raise UserError(f"--input {src} does not exist; pass a Parquet file or directory")
        return [src], False
    from ravfm.data.convert import convert
    from ravfm.data.index import split_paths

    out = tmp_root / "input"
    print(f"ravfm score: {src} is not Parquet: converting it as {dataset} first", file=sys.stderr)
    convert(dataset, src, str(out), split="test")
    return split_paths(out, "test"), True


def _parts(paths: list[str], rows_per_part: int) -> list[dict]:
    """Work items in input order: each a run of whole row groups of one file, ~rows_per_part
    rows, named part-FFFFF-CCCC.parquet so name order is input order."""
    from ravfm.features.stream import row_groups

    items = []
    for i, path in enumerate(paths):
        groups: list[int] = []
        rows = 0
        file_groups = row_groups([path])
        for g in file_groups:
            groups.append(g.group)
            rows += g.rows
            if rows >= rows_per_part or g is file_groups[-1]:
                items.append(
                    {
                        "path": path,
                        "groups": groups,
                        "rows": rows,
                        "part": f"part-{i:05d}-{len(items):04d}.parquet",
                    }
                )
                groups, rows = [], 0
    return items


class _PartWriter:
    """Actor: scores whole parts. Reads a part's row groups batch by batch, scores them, and
    writes its output file in the same row order (one output row per input row)."""

    def __init__(
        self,
        checkpoint: str,
        keep: tuple[str, ...],
        columns: list[str],
        output: str,
        batch_size: int,
        device: str,
        threads: int = 1,
    ) -> None:
        # One actor per core: its Parquet decoding, Polars hashing and torch ops get that core's
        # one thread (set before Polars starts its pool in this process), not a pool per core of
        # the machine each, which oversubscribes the cores and spins.
        self.t_init = time.time()  # when this actor started loading (start-up telemetry)
        os.environ["POLARS_MAX_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        pa.set_cpu_count(threads)  # Arrow's decode pool too
        self.scorer = Scorer(checkpoint, keep, device)
        self.columns, self.output, self.batch_size = columns, output, batch_size

    def __call__(self, items: dict[str, Any]) -> dict[str, Any]:
        written, t0 = [], time.time()
        for path, groups, part in zip(items["path"], items["groups"], items["part"]):
            written.append(self._one(str(path), [int(g) for g in groups], str(part)))
        n = len(written)
        return {
            "part": list(items["part"]),
            "rows": written,
            "t_init": [self.t_init] * n,
            "t0": [t0] * n,
            "t1": [time.time()] * n,
        }

    def _one(self, path: str, groups: list[int], part: str) -> int:
        in_fs, in_p = _fs(path)
        out_fs, out_dir = _fs(self.output)
        tmp, final = f"{out_dir}/.{part}.tmp", f"{out_dir}/{part}"
        rows, writer = 0, None
        with in_fs.open(in_p, "rb") as src, out_fs.open(tmp, "wb") as dst:
            for batch in pq.ParquetFile(src).iter_batches(
                self.batch_size, row_groups=groups, columns=self.columns
            ):
                out = self.scorer(pa.Table.from_batches([batch]))
                writer = writer or pq.ParquetWriter(dst, out.schema, compression="zstd")
                writer.write_table(out)
                rows += out.num_rows
            if writer is not None:
                writer.close()
        if writer is None:  # no rows in these row groups: no file
            out_fs.rm(tmp)
            return 0
        out_fs.mv(tmp, final)
        return rows


def _columns(spec: Any, keep: list[str]) -> list[str]:
    return list(dict.fromkeys(spec.columns + list(keep)))


def _schema(path: str) -> pa.Schema:
    fs, p = _fs(path)
    with fs.open(p, "rb") as f:
        return pq.read_schema(f)


def _check_output(output: str) -> None:
    fs, p = _fs(output)
    if fs.exists(p) and (not fs.isdir(p) or fs.ls(p)):
        raise UserError(
            f"--output {output} already exists and is not empty; pass a new "
            "directory (scoring never overwrites)"
        )
    fs.makedirs(p, exist_ok=True)


def _pool(num_actors: int, num_parts: int) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) sized from the cluster unless given."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if gpus:
        return max(1, min(num_actors or gpus, num_parts)), 1.0, 1.0
    # Each actor reads, hashes, predicts and writes on one core. Their logical CPUs leave one
    # CPU free for Ray Data's own tasks, or on a small machine the pipeline never starts.
    n = max(1, min(num_actors or int(cpus), num_parts))
    return n, max(0.05, min(1.0, (cpus - 1.0) / n)), 0.0


def score(
    checkpoint: str,
    input: str,
    output: str,
    *,
    keep: list[str],
    address: str | None = None,
    batch_size: int = 65536,
    num_actors: int = 0,
) -> dict:
    """Score `input` with `checkpoint` into Parquet files under `output`; returns a summary
    {rows, seconds, rows_per_s, output, columns, actors}.

    Output files part-FFFFF-CCCC.parquet hold the kept columns, `prediction` and (VFM)
    `prediction_std`; read in name order, they are the input rows in input order.
    """
    import ray

    from ravfm.connect import init_ray
    from ravfm.features.spec import FeatureSpec
    from ravfm.features.transform import check_schema
    from ravfm.storage import Store
    from ravfm.train.checkpoint import read_manifest
    from ravfm.train.worker import quiet_data_context

    t0, wall0 = time.perf_counter(), time.time()
    if batch_size < 1 or num_actors < 0:
        raise UserError(
            "--batch-size must be >= 1 and --num-actors >= 0 (0 = sized from the cluster)"
        )
    meta = read_manifest(checkpoint)
    spec = FeatureSpec.load(Store(meta["path"]).url_of("spec"))
    tmp_root = Path(tempfile.mkdtemp(prefix="ravfm-score-"))
    try:
        paths, _ = resolve_input(input, spec.dataset, tmp_root)
        schema = _schema(paths[0]) if paths else None
        if schema is None:
            raise UserError(f"--input {input} holds no rows to score")
        check_schema(schema, spec)
        missing = [c for c in keep if c not in schema.names]
        if missing:
            raise UserError(
                f"--keep names {missing[0]!r}, which {input} does not have; choose "
                f"from {', '.join(schema.names)}"
            )
        _check_output(output)
        items = _parts(paths, rows_per_part=max(batch_size, 262_144))
        init_ray(address)
        quiet_data_context()
        actors, cpus, gpus = _pool(num_actors, len(items))
        kwargs = {
            "checkpoint": meta["path"],
            "keep": tuple(keep),
            "output": output,
            "columns": _columns(spec, keep),
            "batch_size": batch_size,
            "device": "cuda" if gpus else "cpu",
            "threads": max(1, int(cpus)),
        }
        done = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(
                _PartWriter,
                fn_constructor_kwargs=kwargs,
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=cpus,
                num_gpus=gpus,
            )
            .take_all()
        )
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    n_in, n_out = sum(i["rows"] for i in items), sum(int(d["rows"]) for d in done)
    if n_out != n_in or len(done) != len(items):
        raise RuntimeError(
            f"scored {n_out} rows in {len(done)} parts from {n_in} rows in {len(items)} parts"
        )  # a bug, not the user's
    seconds = time.perf_counter() - t0
    # Steady state: first part started to last part written, without startup and planning.
    first = min(float(d["t0"]) for d in done)
    busy = max(float(d["t1"]) for d in done) - first
    # Start-up: the call's start to the first part's start; of that, the actors' spawning
    # (Ray worker, imports) before they begin loading the checkpoint, and the loading.
    spawn = min(float(d["t_init"]) for d in done) - wall0
    vfm = meta["config"]["model"]["name"] == "vfm"
    columns = [*keep, PREDICTION] + ([PREDICTION_STD] if vfm else [])
    summary = {
        "rows": n_in,
        "seconds": round(seconds, 3),
        "rows_per_s": n_in / max(seconds, 1e-9),
        "output": output,
        "columns": columns,
        "actors": actors,
        "parts": len(items),
        "scoring_seconds": round(busy, 3),
        "scoring_rows_per_s": n_in / max(busy, 1e-9),
        "startup_seconds": round(first - wall0, 3),
        "startup_until_actor_spawned_seconds": round(spawn, 3),
    }
    print(
        f"ravfm score: {n_in:,} rows -> {output} ({', '.join(columns)}) in {seconds:.1f} s, "
        f"{summary['rows_per_s']:,.0f} rows/s with {actors} actor(s) "
        f"({summary['scoring_rows_per_s']:,.0f} rows/s once running, after "
        f"{first - wall0:.1f} s of start-up)",
        file=sys.stderr,
    )
    return summary
