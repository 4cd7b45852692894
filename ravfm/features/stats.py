"""`ravfm stats`: one streaming pass over the train split -> feature_spec.json + frequencies.

The pass reads the train shards batch by batch (bounded memory: per-batch counts of each
(field, row) pair, merged into one running table whose size is the number of distinct pairs),
measures the longest list of each multi-valued field, and with numeric=quantile first fits
bucket edges on a bounded sample (a second, numeric-columns-only pass). Min-count folding then
keeps the rows seen at least min_count times; the counts of every other row go to the OOV row
of the field they came from. `frequencies.parquet` (row Int64, count Int64) lists each row of
the compact id space (FeatureSpec) with a non-zero count, which is what RaFM ranks features by.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ravfm.config import FeatureConfig
from ravfm.data.index import read_index, split_paths
from ravfm.errors import UserError
from ravfm.features.side import write_side_tables
from ravfm.features.spec import FeatureSpec, build_spec
from ravfm.features.transform import check_schema, field_ids, multi_items
from ravfm.settings import local_cpus
from ravfm.storage import Store, open_url

__all__ = ["run_stats", "load_frequencies", "count_rows", "FREQ_NAME", "MAX_MULTI_WIDTH"]

FREQ_NAME = "frequencies.parquet"
MAX_MULTI_WIDTH = 256  # longer lists keep their first 256 items (in counts and in transform)
_SAMPLE_ROWS = 1_000_000  # quantile edges are fitted on at most this many train values
_BATCH = 65536
_MERGE_ROWS = 1 << 21  # partial counts held before a merge (at least the merged table's size)


def _batches(paths: list[str], columns: list[str]) -> Iterator[pl.DataFrame]:
    """Every row group of `paths` (page checksums verified) as frames of up to _BATCH rows;
    a damaged one is one UserError naming the file and the row group."""
    for path in paths:
        group = None
        try:
            with open_url(path) as fh:
                pf = pq.ParquetFile(fh, page_checksum_verification=True)
                for group in range(pf.num_row_groups):
                    table = pf.read_row_group(group, columns=columns)
                    for rb in table.to_batches(max_chunksize=_BATCH):
                        yield pl.from_arrow(pa.Table.from_batches([rb]))
        except (OSError, pa.ArrowException) as e:
            where = f"row group {group}" if group is not None else "its footer"
            raise UserError(
                f"{path}: {where} cannot be read ({str(e).splitlines()[0]}); the shard is "
                "damaged: re-run `ravfm convert` for this dataset"
            ) from None


def _shard_schema(path: str) -> pa.Schema:
    try:
        with open_url(path) as fh:
            return pq.ParquetFile(fh).schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise UserError(
            f"{path}: cannot read this Parquet shard ({e}); re-run `ravfm convert`"
        ) from None


def count_rows(df: pl.DataFrame, spec: FeatureSpec) -> tuple[np.ndarray, dict[str, int]]:
    """Row ids (before folding) of every position transform would fill, keyed by field.

    Returns keys (M,) int64 = row * #fields + field number, and each multi field's longest list.
    """
    nf, keys, longest = len(spec.fields), [], {}
    for i, f in enumerate(spec.fields):
        if f.kind == "multi":
            rows, pos, ids, _ = multi_items(df, f)
            longest[f.name] = int(pos.max()) + 1 if len(pos) else 0
            ids = ids[pos < MAX_MULTI_WIDTH]
        else:
            ids = field_ids(df, f)
        keys.append(ids * nf + i)
    return np.concatenate(keys), longest


class _PairCounts:
    """Running counts of (field, row) keys: per-batch counts, merged when they pile up.

    Merging only once the pending partial counts outgrow the merged table keeps the total
    work near-linear in the data, and memory near the number of distinct keys.
    """

    def __init__(self) -> None:
        self.merged = pl.DataFrame(schema={"key": pl.Int64, "count": pl.Int64})
        self.pending: list[pl.DataFrame] = []
        self.pending_rows = 0

    def add(self, keys: np.ndarray) -> None:
        part = (
            pl.DataFrame({"key": keys}).group_by("key").agg(pl.len().cast(pl.Int64).alias("count"))
        )
        self.pending.append(part)
        self.pending_rows += part.height
        if self.pending_rows >= max(self.merged.height, _MERGE_ROWS):
            self.collect()

    def collect(self) -> pl.DataFrame:
        if self.pending:
            parts = pl.concat([self.merged, *self.pending])
            self.merged = parts.group_by("key").agg(pl.col("count").sum())
            self.pending, self.pending_rows = [], 0
        return self.merged


def _fit_edges(
    paths: list[str], spec: FeatureSpec, buckets: int, total: int, seed: int
) -> dict[str, tuple[float, ...]]:
    names = [f.name for f in spec.fields if f.kind == "numeric"]
    rate = min(1.0, _SAMPLE_ROWS / max(total, 1))
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for df in _batches(paths, names):
        take = rng.random(df.height) < rate
        for n in names:
            v = df[n].cast(pl.Float64).fill_nan(None).to_numpy()[take]
            parts[n].append(v[~np.isnan(v)])
    edges = {}
    for n in names:
        v = np.concatenate(parts[n]) if parts[n] else np.zeros(0)
        q = np.quantile(v, np.linspace(0, 1, buckets + 1)[1:-1]) if len(v) else np.zeros(1)
        edges[n] = tuple(float(e) for e in np.unique(q))
    return edges


_DENSE_MAX = 1 << 26  # hashed rows counted in one dense array (8 bytes each) at most
_KEEP_BYTES = 1 << 30  # hashed ids held between the two passes of the dense count


class _Labels:
    """Running count, sum, min and max of the train labels (the regression bias starts at the
    mean; predictions are clipped to [min, max])."""

    def __init__(self) -> None:
        self.n, self.total, self.lo, self.hi = 0, 0.0, math.inf, -math.inf

    def add(self, y: np.ndarray) -> None:
        if len(y):
            self.n += len(y)
            self.total += float(y.sum(dtype=np.float64))
            self.lo, self.hi = min(self.lo, float(y.min())), max(self.hi, float(y.max()))

    def stats(self) -> dict:
        if not self.n:
            return {}
        return {"n": self.n, "mean": self.total / self.n, "min": self.lo, "max": self.hi}


def _count_dense(
    paths: list[str], spec: FeatureSpec, threads: int
) -> tuple[pl.DataFrame, np.ndarray, int, int, _Labels]:
    """The fast count for specs of scalar fields: the train rows hashed by the compiled
    transform (a thread pool), every hashed row counted in one dense array, and, with
    min_count > 1, a second pass counting per field the positions whose row was not kept.
    Returns what _fold does (frequencies, kept rows, #folded) and the rows and labels seen."""
    from ravfm.features.stream import row_groups, thread_blocks

    counts = np.zeros(spec.num_rows, np.int64)
    labels, seen = _Labels(), 0
    groups = row_groups(paths)
    # The hashed ids are kept for the per-field pass when they fit in _KEEP_BYTES (as uint32),
    # else that pass hashes the rows again.
    keep = (
        spec.min_count > 1
        and spec.num_rows < 2**32
        and (sum(g.rows for g in groups) * spec.num_fields * 4 <= _KEEP_BYTES)
    )
    held: list[np.ndarray] = []
    for block in thread_blocks(groups, spec, threads, with_rows=False):
        counts += np.bincount(block["ids"].ravel(), minlength=spec.num_rows)
        labels.add(block["label"])
        seen += len(block["label"])
        if keep:
            held.append(block["ids"].astype(np.uint32))
    kept = np.flatnonzero(counts >= spec.min_count).astype(np.int64)
    kept = kept[kept > 0]
    oov = np.zeros(len(spec.fields), np.int64)
    if spec.min_count > 1:
        folded = counts < spec.min_count
        again = held or (b["ids"] for b in thread_blocks(groups, spec, threads, with_rows=False))
        for ids in again:
            oov += folded[ids].sum(axis=0)
    n_kept = len(kept)
    freq = pl.DataFrame(
        {
            "row": np.concatenate([np.arange(1, n_kept + 1), n_kept + 1 + np.arange(len(oov))]),
            "count": np.concatenate([counts[kept], oov]),
        },
        schema={"row": pl.Int64, "count": pl.Int64},
    ).filter(pl.col("count") > 0)
    n_folded = int(np.count_nonzero(counts[1:])) - n_kept
    return freq, kept, n_folded, seen, labels


def run_stats(
    shards: str, out: str, cfg: FeatureConfig, *, threads: int | None = None, general: bool = False
) -> FeatureSpec:
    """Count the train split's rows, fold rare ones, write out/feature_spec.json + frequencies.

    Specs of scalar fields (Criteo, Avazu, MovieLens ids) over at most 2^26 hashed rows take
    the fast dense count (`threads` threads, default all); others, or general=True, the
    general one ((field, row) pairs merged by Polars). Both give the same spec and counts."""
    index = read_index(shards)
    paths = split_paths(shards, "train")
    if not paths:
        raise UserError(f"{shards}: the train split has no shards; convert with a train share > 0")
    # Validate fields and schema before any work: the index's schema and the first shard's.
    probe_cfg = dataclasses.replace(cfg, numeric="log2")
    probe = build_spec(index, probe_cfg)
    check_schema(index["schema"], probe)
    check_schema(_shard_schema(paths[0]), probe)
    total = sum(s["rows"] for s in index["shards"] if s["split"] == "train")
    edges = None
    if cfg.numeric == "quantile":
        edges = _fit_edges(paths, probe, cfg.quantile_buckets, total, cfg.seed)
    base = build_spec(index, cfg, edges=edges)
    fast = (
        not general
        and index.get("dataset") != "libsvm"
        and all(f.kind != "multi" for f in base.fields)
        and base.num_rows <= _DENSE_MAX
    )
    if fast:
        threads = threads or local_cpus()
        freq, kept, n_folded, rows_seen, labels = _count_dense(paths, base, threads)
        task, widths = None, {}
    else:
        freq, kept, n_folded, rows_seen, labels, task, widths = _count_general(paths, index, base)
    spec = build_spec(index, cfg, task=task, edges=edges, widths=widths, kept_rows=kept)
    spec = dataclasses.replace(spec, label_stats=labels.stats())
    outp = Store(out)
    spec.save(out)
    buf = io.BytesIO()
    freq.write_parquet(buf)
    outp.write_bytes(FREQ_NAME, buf.getvalue())
    write_side_tables(shards, out)  # MovieLens: user and item side features for `ravfm serve`
    print(
        f"ravfm stats: {rows_seen:,} train rows in {len(paths)} shard(s), {len(spec.fields)} "
        f"fields (F={spec.num_fields}), task {spec.task}, {freq.height:,} used rows of "
        f"N={spec.num_rows:,}, min_count {cfg.min_count} folded {n_folded:,} rows into OOV; "
        f"wrote {outp.url_of('feature_spec.json')}"
    )
    return spec


def _count_general(paths: list[str], index: dict, base: FeatureSpec) -> tuple:
    """The general count: (field, row) pairs of every batch merged by Polars."""
    label = index.get("label") if index.get("label") in index["schema"] else None
    columns = sorted(set(base.columns) | {label} - {None})
    counts, longest, rows_seen, unit_labels, labels = _PairCounts(), {}, 0, True, _Labels()
    for df in _batches(paths, columns):
        keys, lg = count_rows(df, base)
        counts.add(keys)
        longest = {k: max(v, longest.get(k, 0)) for k, v in lg.items()}
        rows_seen += df.height
        if label is not None:
            y = df[label].cast(pl.Float64)
            unit_labels &= bool(y.is_in([-1.0, 0.0, 1.0]).all())
            labels.add(y.drop_nulls().to_numpy())
    # libSVM/libFM files hold either click labels (-1/+1, 0/1) or ratings: tell them apart.
    task = None if index.get("dataset") != "libsvm" else ("binary" if unit_labels else "regression")
    widths = {k: max(1, min(v, MAX_MULTI_WIDTH)) for k, v in longest.items()}
    freq, kept, n_folded = _fold(counts.collect(), base)
    return freq, kept, n_folded, rows_seen, labels, task, widths


def _fold(acc: pl.DataFrame, spec: FeatureSpec) -> tuple[pl.DataFrame, np.ndarray, int]:
    """(frequencies in the compact id space, kept hashed rows (sorted), #rows folded).

    A hashed row is kept when seen at least min_count times; kept row j becomes compact row
    j + 1, and the counts of the others go to the OOV row of the field they came from
    (compact row K + 1 + field)."""
    nf = len(spec.fields)
    empty = pl.DataFrame({"row": [], "count": []}, schema={"row": pl.Int64, "count": pl.Int64})
    if acc.height == 0:
        return empty, np.zeros(0, np.int64), 0
    pairs = acc.select(
        (pl.col("key") // nf).alias("row"), (pl.col("key") % nf).alias("field"), "count"
    )
    totals = pairs.group_by("row").agg(pl.col("count").sum())
    kept = totals.filter(pl.col("count") >= spec.min_count).sort("row")
    kept_rows = kept["row"].to_numpy().astype(np.int64)
    n_kept = len(kept_rows)
    compact = kept.select(pl.int_range(1, n_kept + 1, dtype=pl.Int64).alias("row"), "count")
    folded = (
        pairs.join(kept.select("row"), on="row", how="anti")
        .group_by("field")
        .agg(pl.col("count").sum())
        .select((pl.col("field").cast(pl.Int64) + 1 + n_kept).alias("row"), "count")
    )
    freq = pl.concat([compact, folded]).filter(pl.col("count") > 0).sort("row")
    return freq, kept_rows, totals.height - n_kept


def load_frequencies(out_dir: str | Path, num_rows: int) -> np.ndarray:
    """Train counts per row of the final id space: int64 (N,), zero for unseen rows."""
    store = Store(out_dir)
    p = store.url_of(FREQ_NAME)
    if not store.exists(FREQ_NAME):
        raise UserError(f"{out_dir}: no {FREQ_NAME}; run `ravfm stats SHARDS --out {out_dir}`")
    df = pl.read_parquet(io.BytesIO(store.read_bytes(FREQ_NAME)), columns=["row", "count"])
    rows = df["row"].to_numpy()
    if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
        raise UserError(
            f"{p}: row ids reach {rows.max()} but the table has {num_rows} rows; the "
            "frequencies belong to another feature spec, re-run `ravfm stats`"
        )
    out = np.zeros(num_rows, np.int64)
    out[rows] = df["count"].to_numpy()
    return out
