"""A split's rows as hashed batches: which row groups a rank reads, in what order, and how they
become fixed-size, shuffled batches. The same for one process and for Ray Train workers.

- `row_groups`: every Parquet row group of a split (metadata only).
- `rank_groups`: the row groups rank r of W reads in an epoch: a seeded permutation of all of
  them (a new one every epoch; none for evaluation), dealt round-robin, so every row group goes
  to exactly one rank and no row is dropped for any W (ranks may get different row counts;
  training keeps them in lockstep).
- `read_group`: one row group read and hashed with the feature spec (a "block").
- `thread_blocks`: blocks of a list of row groups, in order, read and hashed by a thread pool a
  few groups at a time. The caller's compute then runs between those bursts, so hashing and a
  torch step never compete for the same cores (on a 2-core machine an intra-op pool sharing a
  core with a busy thread waits at every barrier).
- `rebatch`: blocks -> batches of exactly `batch_size` rows (the last one shorter), shuffled
  within windows of `shuffle_rows` rows by a seeded generator, dropping rows listed in `skip`
  (rows a restarted run already trained). It depends only on the sequence of rows, so any
  executor that yields the same rows in the same order gives the same batches.

No torch and no Ray here: the trainer turns the numpy batches into tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ravfm.data.schemas import ROW_COLUMN
from ravfm.errors import UserError
from ravfm.features.spec import FeatureSpec
from ravfm.features.transform import transform
from ravfm.storage import open_url

__all__ = [
    "RowGroup",
    "row_groups",
    "split_groups",
    "rank_groups",
    "read_group",
    "hash_table",
    "thread_blocks",
    "rebatch",
    "Block",
]

Block = dict[str, np.ndarray]  # {"ids" (B, F), "values" (B, F), "label" (B,), "row" (B,), ...}


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group: the file (local path or URL), its index in the file, its rows."""

    path: str
    group: int
    rows: int


def row_groups(paths: list[str]) -> list[RowGroup]:
    """Every row group of `paths` (local paths or fsspec URLs), in file order."""
    import pyarrow.parquet as pq

    out = []
    for path in paths:
        try:
            with open_url(path) as f:
                md = pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowException) as e:
            raise UserError(
                f"{path}: not a readable Parquet shard ({str(e).splitlines()[0]}); "
                "re-run `ravfm convert` for this dataset"
            ) from None
        out += [RowGroup(str(path), g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
    return out


def split_groups(shards: str, index: dict, split: str, spec: FeatureSpec) -> list[RowGroup]:
    """The row groups of one split, after checking every shard against _index.json: its footer
    reads, its row count is the index's, and it has the columns the spec needs, typed as the
    spec hashes them (metadata only). A mismatch is one UserError naming the file and the fix."""
    import pyarrow.parquet as pq

    from ravfm.data.index import shard_url
    from ravfm.features.transform import check_schema

    if index.get("dataset") != spec.dataset:
        raise UserError(
            f"{shards} holds {index.get('dataset')} shards but the feature spec is for "
            f"{spec.dataset}; pass shards of the dataset the model was trained on"
        )
    out = []
    for entry in (s for s in index["shards"] if s["split"] == split):
        path = shard_url(shards, entry["path"])
        try:
            with open_url(path) as f:
                pf = pq.ParquetFile(f)
                md, schema = pf.metadata, pf.schema_arrow
        except FileNotFoundError:
            raise UserError(
                f"{path} is missing (listed in {shards}/_index.json); re-run `ravfm convert`"
            ) from None
        except (OSError, pa.ArrowException) as e:
            raise UserError(
                f"{path}: not a readable Parquet shard ({str(e).splitlines()[0]}); "
                "re-run `ravfm convert` for this dataset"
            ) from None
        if md.num_rows != entry["rows"]:
            raise UserError(
                f"{path} holds {md.num_rows:,} rows, _index.json says {entry['rows']:,}; the "
                "shard was replaced or damaged: re-run `ravfm convert`"
            )
        try:
            check_schema(schema, spec)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        out += [RowGroup(path, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
    return out


def rank_groups(
    groups: list[RowGroup], rank: int, size: int, seed: int | None = None, epoch: int = 0
) -> list[RowGroup]:
    """The row groups rank `rank` of `size` reads: with a seed, a permutation drawn anew for
    every epoch (the same on every rank), then every size-th from position rank."""
    order = list(groups)
    if seed is not None:
        perm = np.random.default_rng([seed, epoch]).permutation(len(order))
        order = [order[i] for i in perm]
    return order[rank::size]


def _column(table: pa.Table, name: str) -> np.ndarray:
    # Array.to_numpy, not ChunkedArray.to_numpy: the latter imports pandas (0.3 s of start-up)
    return table.column(name).combine_chunks().to_numpy(zero_copy_only=False)


def hash_table(table: pa.Table, spec: FeatureSpec, keep: tuple[str, ...] = ()) -> Block:
    """An Arrow table -> {"ids", "values", "label", ["row"], kept columns} (see `transform`)."""
    out = transform(table, spec)
    if ROW_COLUMN in table.column_names:
        out["row"] = _column(table, ROW_COLUMN).astype(np.int64, copy=False)
    for col in keep:
        out[col] = _column(table, col)
    return out


def read_group(
    g: RowGroup, spec: FeatureSpec, keep: tuple[str, ...] = (), with_rows: bool = True
) -> Block:
    """Read row group `g` (the columns the spec needs, the row numbers unless not with_rows,
    `keep`) and hash it."""
    import pyarrow.parquet as pq

    want = {*spec.columns, spec.label, *keep} | ({ROW_COLUMN} if with_rows else set())
    want -= {None}
    try:
        with open_url(g.path) as f:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
            cols = [c for c in pf.schema_arrow.names if c in want]
            table = pf.read_row_group(g.group, columns=cols)
    except (OSError, pa.ArrowException) as e:
        raise UserError(
            f"{g.path}: row group {g.group} cannot be read ({str(e).splitlines()[0]}); "
            "the shard is damaged: re-run `ravfm convert` for this dataset"
        ) from None
    if table.num_rows != g.rows:
        raise UserError(
            f"{g.path}: row group {g.group} holds {table.num_rows} rows, its footer said "
            f"{g.rows}; the shard is damaged: re-run `ravfm convert`"
        )
    return hash_table(table, spec, keep)


def thread_blocks(
    groups: Iterable[RowGroup],
    spec: FeatureSpec,
    threads: int,
    keep: tuple[str, ...] = (),
    with_rows: bool = True,
) -> Iterator[Block]:
    """Blocks of `groups` in order, `threads` groups read and hashed at a time in parallel.

    Nothing is read ahead while the caller works on the blocks it was given: a burst of
    hashing, then the caller's compute, so the two never share cores."""
    pending = list(groups)
    if threads <= 1:
        for g in pending:
            yield read_group(g, spec, keep, with_rows)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="ravfm-hash") as pool:
        for i in range(0, len(pending), threads):
            burst = list(
                pool.map(lambda g: read_group(g, spec, keep, with_rows), pending[i : i + threads])
            )
            yield from burst


def _concat(parts: list[Block]) -> Block:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _take(block: Block, index: np.ndarray | slice) -> Block:
    return {k: v[index] for k, v in block.items()}


def _drop_skipped(block: Block, skip: np.ndarray | None) -> Block:
    if skip is None or not skip.size or "row" not in block:
        return block
    keep = ~np.isin(block["row"], skip)
    return block if keep.all() else _take(block, keep)


def rebatch(
    blocks: Iterable[Block],
    batch_size: int,
    *,
    shuffle_rows: int = 0,
    seed: Any = None,
    skip: np.ndarray | None = None,
) -> Iterator[Block]:
    """Batches of `batch_size` rows from `blocks` (the last one may be shorter). With
    shuffle_rows > 0 and a seed, the rows are cut into windows of shuffle_rows (rounded up to
    whole batches), each permuted by one seeded generator before it is cut into batches.
    Windows are counted in rows, so the batches depend only on the sequence of rows, not on
    how it was split into blocks. Rows whose "row" number is in `skip` are left out."""
    rng = np.random.default_rng(seed) if shuffle_rows > 0 and seed is not None else None
    window = batch_size * max(1, -(-shuffle_rows // batch_size)) if rng is not None else batch_size
    parts: list[Block] = []
    held = 0
    for block in blocks:
        block = _drop_skipped(block, skip)
        if not len(block["label"]):
            continue
        parts.append(block)
        held += len(block["label"])
        if held < window:
            continue
        pool = _concat(parts)
        full = held - held % window
        for start in range(0, full, window):
            yield from _cut(_take(pool, slice(start, start + window)), batch_size, rng)
        parts = [_take(pool, slice(full, held))] if full < held else []
        held -= full
    if held:
        yield from _cut(_concat(parts), batch_size, rng)


def _cut(pool: Block, batch_size: int, rng: np.random.Generator | None) -> Iterator[Block]:
    n = len(pool["label"])
    if rng is not None:
        pool = _take(pool, rng.permutation(n))
    for start in range(0, n, batch_size):
        yield _take(pool, slice(start, min(n, start + batch_size)))
