"""`ravfm stats`: one streaming pass over the train split -> feature_spec.json + frequencies.

The pass reads the train shards batch by batch (bounded memory: per-batch counts of each
(field, row) pair, merged into one running table whose size is the number of distinct pairs),
measures the longest list of each multi-valued field, and with numeric=quantile first fits
bucket edges on a bounded sample (a second, numeric-columns-only pass). Min-count folding then
keeps the rows seen at least min_count times; the counts of every other row go to the OOV row
of the field they came from. `frequencies.parquet` (row Int64, count Int64) lists each row of
the final id space with a non-zero count, which is what RaFM ranks features by.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import fsspec
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

__all__ = ["run_stats", "load_frequencies", "count_rows", "FREQ_NAME", "MAX_MULTI_WIDTH"]

FREQ_NAME = "frequencies.parquet"
MAX_MULTI_WIDTH = 256  # longer lists keep their first 256 items (in counts and in transform)
_SAMPLE_ROWS = 1_000_000  # quantile edges are fitted on at most this many train values
_BATCH = 65536
_MERGE_ROWS = 1 << 21  # partial counts held before a merge (at least the merged table's size)


def _batches(paths: list[str], columns: list[str]) -> Iterator[pl.DataFrame]:
    for path in paths:
        with fsspec.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            for rb in pf.iter_batches(batch_size=_BATCH, columns=columns):
                yield pl.from_arrow(pa.Table.from_batches([rb]))


def _shard_schema(path: str) -> pa.Schema:
    try:
        with fsspec.open(path, "rb") as fh:
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


def run_stats(shards: str, out: str, cfg: FeatureConfig) -> FeatureSpec:
    """Count the train split's rows, fold rare ones, write out/feature_spec.json + frequencies."""
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
    label = index.get("label") if index.get("label") in index["schema"] else None
    columns = sorted(set(base.columns) | {label} - {None})
    counts, longest, rows_seen, unit_labels = _PairCounts(), {}, 0, True
    for df in _batches(paths, columns):
        keys, lg = count_rows(df, base)
        counts.add(keys)
        longest = {k: max(v, longest.get(k, 0)) for k, v in lg.items()}
        rows_seen += df.height
        if label is not None:
            unit_labels &= bool(df[label].cast(pl.Float64).is_in([-1.0, 0.0, 1.0]).all())
    # libSVM/libFM files hold either click labels (-1/+1, 0/1) or ratings: tell them apart.
    task = None if index.get("dataset") != "libsvm" else ("binary" if unit_labels else "regression")
    widths = {k: max(1, min(v, MAX_MULTI_WIDTH)) for k, v in longest.items()}
    freq, kept, n_folded = _fold(counts.collect(), base)
    spec = build_spec(index, cfg, task=task, edges=edges, widths=widths, kept_rows=kept)
    outp = Path(out)
    spec.save(outp)
    freq.write_parquet(outp / FREQ_NAME)
    write_side_tables(shards, outp)  # MovieLens: user and item side features for `ravfm serve`
    print(
        f"ravfm stats: {rows_seen:,} train rows in {len(paths)} shard(s), {len(spec.fields)} "
        f"fields (F={spec.num_fields}), task {spec.task}, {freq.height:,} used rows of "
        f"N={spec.num_rows:,}, min_count {cfg.min_count} folded {n_folded:,} rows into OOV; "
        f"wrote {outp / 'feature_spec.json'}"
    )
    return spec


def _fold(acc: pl.DataFrame, spec: FeatureSpec) -> tuple[pl.DataFrame, np.ndarray | None, int]:
    """(frequencies in the final id space, kept rows or None when min_count == 1, #folded)."""
    nf = len(spec.fields)
    empty = pl.DataFrame({"row": [], "count": []}, schema={"row": pl.Int64, "count": pl.Int64})
    if acc.height == 0:
        return empty, (None if spec.min_count == 1 else np.zeros(0, np.int64)), 0
    pairs = acc.select(
        (pl.col("key") // nf).alias("row"), (pl.col("key") % nf).alias("field"), "count"
    )
    totals = pairs.group_by("row").agg(pl.col("count").sum())
    if spec.min_count == 1:
        return totals.sort("row"), None, 0
    kept = totals.filter(pl.col("count") >= spec.min_count)
    oov_of = pl.col("field").replace_strict(
        list(range(nf)), [f.oov_row for f in spec.fields], return_dtype=pl.Int64
    )
    folded = (
        pairs.join(kept.select("row"), on="row", how="anti")
        .group_by("field")
        .agg(pl.col("count").sum())
        .select(oov_of.alias("row"), "count")
    )
    freq = pl.concat([kept, folded]).filter(pl.col("count") > 0).sort("row")
    kept_rows = np.sort(kept["row"].to_numpy()).astype(np.int64)
    return freq, kept_rows, totals.height - kept.height


def load_frequencies(out_dir: str | Path, num_rows: int) -> np.ndarray:
    """Train counts per row of the final id space: int64 (N,), zero for unseen rows."""
    p = Path(out_dir) / FREQ_NAME
    if not p.is_file():
        raise UserError(f"{out_dir}: no {FREQ_NAME}; run `ravfm stats SHARDS --out {out_dir}`")
    df = pl.read_parquet(p, columns=["row", "count"])
    rows = df["row"].to_numpy()
    if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
        raise UserError(
            f"{p}: row ids reach {rows.max()} but the table has {num_rows} rows; the "
            "frequencies belong to another feature spec, re-run `ravfm stats`"
        )
    out = np.zeros(num_rows, np.int64)
    out[rows] = df["count"].to_numpy()
    return out
