"""`ravfm score`: batch predictions for any Parquet dataset (or raw file) with a checkpoint.

The input is cut into parts (runs of whole Parquet row groups, in input order). Each part is
read batch by batch, hashed with the checkpoint's own feature spec, scored and written as one
output file, so every input row gives exactly one output row, in input order, by construction.
Who scores the parts: on one machine (no --address), a thread pool of this process sharing one
loaded model (no Ray: start-up is the imports and the checkpoint); on a cluster, a pool of Ray
actors (GPU actors when it has GPUs) that each load the checkpoint once. The output is
published by a manifest and a success marker written after every part (ravfm.scored).
Output columns: the kept ones, `prediction` (click probability for binary tasks, the rating for
regression) and, for VFM, `prediction_std`. The model side is ravfm.scorer.
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ravfm.errors import UserError

__all__ = ["score", "resolve_input"]


def resolve_input(
    src: str, spec: Any, tmp_root: Path, split: str | None = None
) -> tuple[list[str], bool]:
    """Parquet paths to score, in order, and whether they were converted into `tmp_root`.

    src: a shard directory with _index.json (all its shards, or those of `split`, index order,
    each checked against the index), a Parquet file, a directory of Parquet files (sorted by name), or a raw file of
    the checkpoint's dataset format, which is converted first (one split, input order kept)."""
    from ravfm.data.index import INDEX_NAME, read_index
    from ravfm.features.stream import split_groups
    from ravfm.storage import Store, is_url

    dataset = spec.dataset
    here = Store(src)
    if here.isdir() and here.exists(INDEX_NAME):
        index = read_index(src)
        if split is not None and split not in index["splits"]:
            raise UserError(f"--split {split}: {src} has the splits {', '.join(index['splits'])}")
        for name in index["splits"] if split is None else [split]:
            split_groups(src, index, name, spec)  # footers, row counts and columns
        from ravfm.data.index import shard_url

        chosen = [s for s in index["shards"] if split is None or s["split"] == split]
        return [shard_url(src, s["path"]) for s in chosen], False
    if split is not None:
        raise UserError(f"--split needs shards with an _index.json; {src} is not such a directory")
    if here.isdir() and dataset != "movielens":
        files = sorted(f for f in here.walk_files() if f.endswith(".parquet"))
        if not files:
            raise UserError(
                f"--input {src} is a directory without .parquet files or _index.json; "
                "pass Parquet data, shards from `ravfm convert`, or a raw file"
            )
        return [here.url_of(f) for f in files], False
    if src.endswith(".parquet"):
        if not here.exists():
            raise UserError(f"--input {src} does not exist; pass a Parquet file or directory")
        return [src], False
    if not is_url(src) and not Path(src).exists():
        raise UserError(f"--input {src} does not exist; pass a Parquet file, directory or raw file")
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
        groups, rows, per_file = [], 0, 0
        file_groups = row_groups([path])
        for g in file_groups:
            groups.append(g.group)
            rows += g.rows
            if rows >= rows_per_part or g is file_groups[-1]:
                part = f"part-{i:05d}-{per_file:04d}.parquet"
                items.append({"path": path, "groups": groups, "rows": rows, "part": part})
                groups, rows, per_file = [], 0, per_file + 1
    return items


def _columns(spec: Any, keep: list[str]) -> list[str]:
    return list(dict.fromkeys(spec.columns + list(keep)))


def _check_keep(keep: list[str], paths: list[str], src: str) -> None:
    import pyarrow.parquet as pq

    from ravfm.storage import open_url

    with open_url(paths[0]) as f:
        names = pq.read_schema(f).names
    missing = [c for c in keep if c not in names]
    if missing:
        raise UserError(
            f"--keep names {missing[0]!r}, which {src} does not have; choose from "
            f"{', '.join(names)}"
        )


def _score_local(items: list[dict], job: dict, threads: int) -> tuple[list[dict], float]:
    """Every part scored by `threads` threads of this process sharing one loaded model."""
    import torch

    from ravfm.scored import write_part
    from ravfm.scorer import Scorer

    torch.set_num_threads(1)  # each thread runs its own part's ops: one core each
    scorer = Scorer(job["checkpoint"], tuple(job["keep"]), "cpu", meta=job["meta"])
    t_first = time.time()

    def one(item: dict) -> dict:
        return write_part(scorer, item, job["output"], job["columns"], job["batch_size"])

    with ThreadPoolExecutor(max(1, min(threads, len(items)))) as pool:
        return list(pool.map(one, items)), t_first


def score(
    checkpoint: str,
    input: str,
    output: str,
    *,
    keep: list[str],
    address: str | None = None,
    batch_size: int = 65536,
    num_actors: int = 0,
    engine: str = "auto",
    split: str | None = None,
) -> dict:
    """Score `input` with `checkpoint` into a published output under `output`; returns a summary
    {rows, seconds, rows_per_s, output, columns, engine, workers, parts, startup_seconds, ...}.
    engine: auto (Ray actors when an address or RAY_ADDRESS names a cluster, else this
    process), local or ray. split: score only this split of a shard directory."""
    from ravfm.connect import ray_address
    from ravfm.features.spec import FeatureSpec
    from ravfm.scored import discard, prepare_output, publish
    from ravfm.settings import local_cpus
    from ravfm.storage import Store
    from ravfm.train.checkpoint import read_manifest

    t0, wall0 = time.perf_counter(), time.time()
    if batch_size < 1 or num_actors < 0:
        raise UserError(
            "--batch-size must be >= 1 and --num-actors >= 0 (0 = sized from the machine)"
        )
    meta = read_manifest(checkpoint)
    spec = FeatureSpec.load(Store(meta["path"]).url_of("spec"))
    tmp_root = Path(tempfile.mkdtemp(prefix="ravfm-score-"))
    written: list[dict] = []
    try:
        paths, _ = resolve_input(input, spec, tmp_root, split)
        if not paths:
            raise UserError(f"--input {input} holds no rows to score")
        _check_keep(keep, paths, input)
        store = prepare_output(output)
        items = _parts(paths, rows_per_part=max(batch_size, 262_144))
        job = {"checkpoint": meta["path"], "meta": meta, "keep": keep, "output": store.url,
               "columns": _columns(spec, keep), "batch_size": batch_size}  # fmt: skip
        if engine == "auto":
            engine = "local" if ray_address(address) is None else "ray"
        if engine == "local":
            workers = num_actors or local_cpus()
            written, t_first = _score_local(items, job, workers)
        else:
            from ravfm.score_ray import score_on_ray

            engine = "ray"
            written, t_first, workers = score_on_ray(items, job, address, num_actors)
        n_in, n_out = sum(i["rows"] for i in items), sum(int(d["rows"]) for d in written)
        if n_out != n_in or len(written) != len(items):
            raise RuntimeError(f"scored {n_out} rows from {n_in}")  # a bug, not the user's
        vfm = meta["config"]["model"]["name"] == "vfm"
        columns = _output_columns(keep, vfm)
        publish(store, written, {"checkpoint": meta["path"], "columns": columns, "input": input})
    except BaseException:
        if written:
            discard(Store(output), [w["part"] for w in written if w.get("rows")])
        raise
    finally:
        import shutil

        shutil.rmtree(tmp_root, ignore_errors=True)
    return _summary(n_in, output, columns, engine, workers, len(items), t0, wall0, t_first)


def _output_columns(keep: list[str], vfm: bool) -> list[str]:
    from ravfm.scorer import PREDICTION, PREDICTION_STD, PREDICTION_STD_MODEL

    return [*keep, PREDICTION] + ([PREDICTION_STD, PREDICTION_STD_MODEL] if vfm else [])


def _summary(n_in, output, columns, engine, workers, parts, t0, wall0, t_first) -> dict:
    seconds = time.perf_counter() - t0
    startup = t_first - wall0
    busy = max(seconds - startup, 1e-9)
    summary = {
        "rows": n_in,
        "seconds": round(seconds, 3),
        "rows_per_s": n_in / max(seconds, 1e-9),
        "output": output,
        "columns": columns,
        "engine": engine,
        "workers": workers,
        "parts": parts,
        "scoring_seconds": round(busy, 3),
        "scoring_rows_per_s": n_in / busy,
        "startup_seconds": round(startup, 3),
    }
    where = "in this process" if engine == "local" else "on Ray actors"
    print(
        f"ravfm score: {n_in:,} rows -> {output} ({', '.join(columns)}) in {seconds:.1f} s, "
        f"{summary['rows_per_s']:,.0f} rows/s {where} with {workers} worker(s) "
        f"({summary['scoring_rows_per_s']:,.0f} rows/s once running, after {startup:.1f} s of "
        "start-up: checkpoint and input checks)",
        file=sys.stderr,
    )
    return summary
