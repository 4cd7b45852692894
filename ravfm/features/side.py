"""MovieLens side tables kept beside the feature spec: users.parquet and items.parquet.

`convert` joins each rating with its user's columns (age, gender, occupation, zip) and its
movie's genres, so a rating row carries its side features. An online request names only a
user and an item; the server looks their side features up in these two tables, written by
`ravfm stats` into the spec directory (which every checkpoint copies as spec/). They are built
from every split of the shards (serving may see items that only occur in valid or test) and
hold no labels: one row per id, the first occurrence in shard order.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ravfm.data.index import read_index, split_paths
from ravfm.storage import Store, open_url

__all__ = ["USERS_NAME", "ITEMS_NAME", "USER_COLUMNS", "ITEM_COLUMNS", "write_side_tables"]

USERS_NAME = "users.parquet"
ITEMS_NAME = "items.parquet"
USER_COLUMNS = ("user_id", "age", "gender", "occupation", "zip")
ITEM_COLUMNS = ("item_id", "genres")
_KEYS = {"user_id", "item_id"}
_RATING_COLUMNS = {"user_id", "item_id", "rating", "timestamp", "_row"}


def _tables(schema: dict) -> dict[str, list[str]]:
    """Columns of each table present in the shards' schema; item columns other than the
    known ones (none today) go with the items."""
    users = [c for c in USER_COLUMNS if c in schema]
    known = set(USER_COLUMNS) | set(ITEM_COLUMNS) | _RATING_COLUMNS
    items = [c for c in ITEM_COLUMNS if c in schema] + [c for c in schema if c not in known]
    return {USERS_NAME: users, ITEMS_NAME: items}


def _read(paths: list[str], cols: list[str]) -> Iterator[pl.DataFrame]:
    for path in paths:
        with open_url(path) as fh:
            for rb in pq.ParquetFile(fh).iter_batches(batch_size=1 << 20, columns=cols):
                yield pl.from_arrow(pa.Table.from_batches([rb]))


def write_side_tables(shards: str, out: str | Path) -> list[str]:
    """Write out/users.parquet and out/items.parquet from every split of movielens `shards`
    (users: when the shards carry user columns); returns the paths written ([] for other
    datasets). Memory is bounded by the number of distinct users and items."""
    index = read_index(shards)
    if index.get("dataset") != "movielens":
        return []
    paths = [p for split in index["splits"] for p in split_paths(shards, split)]
    written = []
    for name, cols in _tables(index["schema"]).items():
        key = cols[0]
        if len(cols) < 2 or key not in _KEYS:
            continue  # no side columns (ml-10m and later have no user features)
        table = None
        for df in _read(paths, cols):
            both = df if table is None else pl.concat([table, df])
            table = both.unique(subset=key, keep="first", maintain_order=True)
        if table is None:
            continue
        table = table.sort(key)
        buf = io.BytesIO()
        table.write_parquet(buf)
        store = Store(str(out))
        store.write_bytes(name, buf.getvalue())
        written.append(store.url_of(name))
    return written
