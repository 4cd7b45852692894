"""Which split each converted row goes to, and handing the rows to the shard writers.

The rule (`split_rule`) is recorded in _index.json; `Router` applies it in convert's writer
thread: by a seeded hash of each row's source row number (ravfm.data.split), or every row of a
part to one split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from ravfm.data.index import SPLITS
from ravfm.data.movielens import STANDARD_SPLITS
from ravfm.data.parse import Parsed
from ravfm.data.schemas import ROW_COLUMN
from ravfm.data.shards import ShardSet
from ravfm.data.split import HASH_RULE, hash_split, split_thresholds
from ravfm.errors import UserError

__all__ = ["Router", "split_rule"]


def split_rule(fmt: str, split: str, ratios: tuple[float, ...], seed: int) -> dict[str, Any]:
    """The split rule recorded in _index.json for --split SPLIT (hash, train/valid/test, or a
    MovieLens 100K standard split); an invalid choice is a UserError naming the valid ones."""
    if split == "hash":
        try:
            split_thresholds(ratios)
        except ValueError as e:
            raise UserError(f"--split-ratios: {e}") from None
        return {
            "kind": "hash",
            "seed": seed,
            "ratios": [float(r) for r in ratios],
            "rule": HASH_RULE,
        }
    if split in SPLITS:
        return {"kind": "all", "split": split}
    if split in STANDARD_SPLITS and fmt == "movielens":
        return {
            "kind": "standard",
            "name": split,
            "train": f"{split}.base",
            "test": f"{split}.test",
        }
    raise UserError(
        f"--split {split!r} is not valid for {fmt}; use hash, train, valid or test"
        + (" (or u1..u5, ua, ub for MovieLens 100K)" if fmt == "movielens" else "")
    )


class Router:
    """Writer-thread side: assigns each parsed row its split and appends it to the shards."""

    def __init__(self, shards: ShardSet, rule: dict[str, Any]) -> None:
        self.shards, self.rule = shards, rule
        self.rows = {s: 0 for s in SPLITS}

    def _one_split(self, fixed: str | None) -> str | None:
        """The split every row of a part goes to (its fixed split, or the rule's "all"), or
        None when rows are split by the hash of their row number."""
        return fixed or (self.rule["split"] if self.rule["kind"] == "all" else None)

    def codes(self, row_base: int, lines: int, fixed: str | None) -> np.ndarray:
        """(lines,) int8 split code (index in SPLITS) of each line of a block."""
        split = self._one_split(fixed)
        if split is not None:
            return np.full(lines, SPLITS.index(split), np.int8)
        rows = np.arange(row_base, row_base + lines, dtype=np.int64)
        return hash_split(rows, self.rule["seed"], self.rule["ratios"])

    def add_routed(self, parts: list[pa.Table], codes: np.ndarray, row_base: int) -> None:
        """Append a block the format parsed and routed itself: parts[k] holds, in line order,
        the rows of the lines with code k (every line parsed)."""
        for k, t in enumerate(parts):
            if t.num_rows:
                rows = np.flatnonzero(codes == k) + row_base
                self.shards.add(SPLITS[k], t.append_column(ROW_COLUMN, pa.array(rows)))
                self.rows[SPLITS[k]] += t.num_rows

    def __call__(self, p: Parsed, row_base: int, fixed: str | None) -> None:
        # The source row number travels with the row: a restarted training run skips exactly
        # the rows its last checkpoint had trained (see ravfm.train.worker).
        p.df = p.df.with_columns(pl.Series(ROW_COLUMN, p.index + row_base, dtype=pl.Int64))
        split = self._one_split(fixed)
        if split is not None:
            self.shards.add(split, p.df)
            self.rows[split] += len(p.df)
            return
        codes = hash_split(p.index + row_base, self.rule["seed"], self.rule["ratios"])
        df = p.df
        for k, name in enumerate(SPLITS):  # peel off one split at a time: fewer rows to scan
            if k < len(SPLITS) - 1:
                mask = codes == k
                part, df = df.filter(pl.Series(mask)), df.filter(pl.Series(~mask))
                codes = codes[~mask]
            else:
                part = df
            if len(part):
                self.shards.add(name, part)
                self.rows[name] += len(part)
