"""The `_index.json` contract beside the shards: what `convert` writes and everyone else reads.

An index records the format version, the dataset and variant, the column schema (Polars dtype
names), the label column, every shard with its split and row count, per-split totals, the split
rule, the source fingerprint and the reject counts. Shard paths are relative to the index so a
shard directory can be moved or uploaded as a whole (local path or any fsspec URL).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import fsspec

from ravfm.errors import UserError

__all__ = [
    "INDEX_NAME",
    "FORMAT_VERSION",
    "REJECTS_DIR",
    "SPLITS",
    "read_index",
    "shard_url",
    "split_paths",
    "write_index",
]

INDEX_NAME = "_index.json"
FORMAT_VERSION = 1
REJECTS_DIR = "_rejects"
SPLITS = ("train", "valid", "test")


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def shard_url(shards_dir: str | os.PathLike, name: str) -> str:
    """The path (or URL) of `name` (relative to the index) in shards_dir."""
    return _join(shards_dir, name)


def _join(shards_dir: str | os.PathLike, name: str) -> str:
    d = str(shards_dir)
    if _is_url(d):
        return d.rstrip("/") + "/" + name
    if d.startswith("file://"):
        d = d[len("file://") :]
    return str(Path(d).resolve() / name)


def read_index(shards_dir: str | os.PathLike) -> dict[str, Any]:
    """Load DIR/_index.json; refuse a missing, unreadable or newer-format index with a UserError."""
    path = _join(shards_dir, INDEX_NAME)
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise UserError(
            f"{shards_dir}: no {INDEX_NAME} found; convert the raw data first with "
            "`ravfm convert FORMAT SRC --out DIR`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: not valid JSON ({e}); re-run `ravfm convert` to rewrite it"
        ) from None
    version = index.get("format_version") if isinstance(index, dict) else None
    if version != FORMAT_VERSION:
        raise UserError(
            f"{path}: format_version {version!r} is not supported (this ravfm reads "
            f"{FORMAT_VERSION}); re-convert the data with this ravfm or upgrade ravfm"
        )
    return index


def split_paths(shards_dir: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths (or URLs) of the shards of one split, in order; [] for an empty split."""
    index = read_index(shards_dir)
    if split not in index["splits"]:
        raise UserError(
            f"{shards_dir}: no split {split!r}; choose one of {', '.join(index['splits'])}"
        )
    return [_join(shards_dir, s["path"]) for s in index["shards"] if s["split"] == split]


def write_index(shards_dir: str | os.PathLike, index: dict[str, Any]) -> Path:
    """Write DIR/_index.json (local directories only; convert writes locally, then renames)."""
    path = Path(shards_dir) / INDEX_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
