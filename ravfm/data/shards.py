"""Parquet shard writers (zstd, fixed row-group size) and the reject log.

Each split has one open shard at a time; rows are buffered only up to one row group, so
memory stays bounded by (row group rows x splits), whatever the input size.
"""

from __future__ import annotations

import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ravfm.data.index import REJECTS_DIR
from ravfm.data.parse import Reject, pl_schema

__all__ = ["ShardSet", "RejectLog", "ROW_GROUP_ROWS", "REJECTS_FILE"]

ROW_GROUP_ROWS = 1 << 17
# Rows waiting per split writer, in row groups: a writer encodes a whole row group at a time,
# so the caller must be able to run that far ahead or the two take turns instead of overlapping
# (a queue of 2 blocks left the train writer idle a third of the time).
_QUEUE_ROW_GROUPS = 2
REJECTS_FILE = "rejects.jsonl"
_COMPAT = pl.CompatLevel.newest()  # string_view: zero-copy from Polars


class _SplitWriter:
    def __init__(
        self, root: Path, split: str, schema: pa.Schema, rows_per_shard: int, row_group_rows: int
    ) -> None:
        self.root, self.split, self.schema = root, split, schema
        # min/max of hashed strings, or of codes (the unsigned columns: Criteo's 32-bit hex
        # codes), prune nothing and cost time (~25% of the write for strings, ~7% for the
        # codes): signed numbers only (labels, counts, row numbers)
        self.stats = [
            f.name
            for f in schema
            if pa.types.is_signed_integer(f.type) or pa.types.is_floating(f.type)
        ]
        # Int64 columns (counts, row numbers) delta-encode: cheaper to write and read than a
        # dictionary and as small; the rest keep a dictionary while it stays under 64 KiB
        # (low-cardinality codes), and high-cardinality ones give it up early instead of at
        # 1 MiB. Measured on Criteo rows: write 2.0 -> 1.3 CPU-s per M rows, read 0.5 -> 0.4,
        # 50 -> 54 MiB.
        delta = [f.name for f in schema if f.type == pa.int64()]
        self.encoding = {
            "use_dictionary": [f.name for f in schema if f.name not in delta],
            "column_encoding": dict.fromkeys(delta, "DELTA_BINARY_PACKED") or None,
            "dictionary_pagesize_limit": 64 << 10,
        }
        self.rows_per_shard, self.rg = rows_per_shard, row_group_rows
        self.buf: list[pa.Table] = []
        self.buffered = 0
        self.writer: pq.ParquetWriter | None = None
        self.in_shard = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, table: pa.Table) -> None:
        self.buf.append(table)
        self.buffered += table.num_rows
        if self.buffered >= self.rg:
            t = pa.concat_tables(self.buf)
            full = t.num_rows // self.rg * self.rg
            self._write(t.slice(0, full))
            rest = t.slice(full)
            self.buf, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows

    def _write(self, t: pa.Table) -> None:
        """Write T in row groups of self.rg rows, starting a new shard every rows_per_shard."""
        while t.num_rows:
            if self.writer is None:
                name = f"{self.split}-{len(self.shards):05d}.parquet"
                self.writer = pq.ParquetWriter(
                    self.root / name,
                    self.schema,
                    compression="zstd",
                    compression_level=1,
                    write_statistics=self.stats,
                    write_page_checksum=True,  # readers verify: damage inside a page is found
                    # No embedded Arrow schema: readers see plain `string`, not Polars'
                    # string_view, which Ray Data's block pickling and older readers reject.
                    store_schema=False,
                    **self.encoding,
                )
                self.shards.append({"path": name, "split": self.split, "rows": 0})
                self.in_shard = 0
            n = min(t.num_rows, self.rg, self.rows_per_shard - self.in_shard)
            self.writer.write_table(t.slice(0, n), row_group_size=n)
            t = t.slice(n)
            self.in_shard += n
            self.shards[-1]["rows"] += n
            if self.in_shard >= self.rows_per_shard:
                self.writer.close()
                self.writer = None

    def close(self) -> list[dict[str, Any]]:
        if self.buffered:
            self._write(pa.concat_tables(self.buf))
            self.buf, self.buffered = [], 0
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.shards


class ShardSet:
    """The shards of every split under ROOT, named `{split}-{k:05d}.parquet`.

    Each split is written by its own thread (pyarrow encodes and compresses without the GIL),
    so the train split's writes overlap the smaller splits' and the caller's parsing; at most
    _QUEUE_ROW_GROUPS row groups of rows wait per split, which keeps memory bounded.
    """

    def __init__(
        self,
        root: Path,
        columns: dict[str, str],
        rows_per_shard: int,
        row_group_rows: int = ROW_GROUP_ROWS,
    ) -> None:
        self.root = root
        self.columns = pl_schema(columns)
        self.schema = pl.DataFrame(schema=self.columns).to_arrow(compat_level=_COMPAT).schema
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = min(row_group_rows, rows_per_shard)
        self.writers: dict[str, _SplitWriter] = {}
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pending: dict[str, deque[tuple[Future, int]]] = {}
        self._waiting: dict[str, int] = {}  # rows queued per split

    def add(self, split: str, rows: pl.DataFrame | pa.Table) -> None:
        """Queue ROWS (in the shard schema's columns) for SPLIT's writer thread."""
        if not len(rows):
            return
        w = self.writers.get(split)
        if w is None:
            w = self.writers[split] = _SplitWriter(
                self.root, split, self.schema, self.rows_per_shard, self.row_group_rows
            )
            self._pools[split] = ThreadPoolExecutor(1, thread_name_prefix=f"ravfm-{split}")
            self._pending[split], self._waiting[split] = deque(), 0
        queue = self._pending[split]
        if isinstance(rows, pl.DataFrame):
            rows = rows.to_arrow(compat_level=_COMPAT)
        queue.append((self._pools[split].submit(w.add, rows.cast(self.schema)), len(rows)))
        self._waiting[split] += len(rows)
        while self._waiting[split] > _QUEUE_ROW_GROUPS * self.row_group_rows:
            done, n = queue.popleft()
            done.result()  # a writer's error surfaces here
            self._waiting[split] -= n

    def close(self) -> list[dict[str, Any]]:
        """Finish every split's writes and close its last shard; the shard list, split order."""
        try:
            for queue in self._pending.values():
                while queue:
                    queue.popleft()[0].result()
        finally:
            self._stop()
        shards = []
        for split in sorted(self.writers, key=lambda s: ("train", "valid", "test").index(s)):
            shards += self.writers[split].close()
        return shards

    def abort(self) -> None:
        """Stop writing (a failed conversion): pending writes are dropped, files left as they
        are for the caller to remove."""
        self._stop(cancel=True)

    def _stop(self, cancel: bool = False) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=cancel)
        self._pools.clear()


class RejectLog:
    """`_rejects/rejects.jsonl`: one JSON object per rejected line (file, line, reason, raw)."""

    def __init__(self, root: Path) -> None:
        self.path = root / REJECTS_DIR / REJECTS_FILE
        self.counts: dict[str, int] = {}
        self._f = None

    def add(self, rejects: list[Reject]) -> None:
        if not rejects:
            return
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.path.open("w", encoding="utf-8")
        for r in rejects:
            self.counts[r.reason] = self.counts.get(r.reason, 0) + 1
            raw = r.raw[:65536].decode("utf-8", errors="backslashreplace")
            self._f.write(
                json.dumps({"file": r.file, "line": r.line, "reason": r.reason, "raw": raw}) + "\n"
            )

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
