"""The output directory of `convert`: may it be written, the atomic swap, the summary.

OUT is built as a temporary sibling and swapped in at the end. An OUT that already holds the
same dataset (format and source URL) is replaced, or skipped as up to date when every source
file's fingerprint (URL, size, mtime or etag) and the options are unchanged; one that holds
another dataset or non-ravfm files is refused.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from ravfm.data.index import INDEX_NAME, read_index
from ravfm.errors import UserError

__all__ = ["out_state", "swap_into", "summarize", "summary_line"]


def out_state(out: Path, fmt: str, src: str, fp: dict[str, Any], options: dict[str, Any]) -> str:
    """'new', 'replace' or 'up-to-date' for OUT; UserError when OUT holds something else."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory path")
    if not (out / INDEX_NAME).exists():
        if any(out.iterdir()):
            raise UserError(
                f"--out {out} already holds files that are not a ravfm dataset; "
                "choose an empty or new directory"
            )
        return "new"
    old = read_index(out)
    if old.get("dataset") != fmt or old.get("source", {}).get("url") != src:
        raise UserError(
            f"--out {out} already holds a different dataset ({old.get('dataset')} "
            f"from {old.get('source', {}).get('url')}); choose another --out or "
            "delete it"
        )
    stamped = all(len(f) > 2 for f in fp["files"])  # url, size and mtime/etag for every file
    if stamped and old.get("source") == fp and old.get("options") == options:
        return "up-to-date"
    return "replace"


def swap_into(tmp: Path, out: Path) -> None:
    """Put TMP in OUT's place; an old OUT is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summarize(index: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {
        "dataset": index["dataset"],
        "variant": index["variant"],
        "rows": index["rows"],
        "lines": index["lines"],
        "splits": {k: v["rows"] for k, v in index["splits"].items()},
        "shards": len(index["shards"]),
        "rejects": index["rejects"],
        "rejected": index["rejected"],
        "seconds": round(seconds, 3),
        "rows_per_s": round(index["lines"] / seconds, 1) if seconds > 0 else None,
    }


def summary_line(fmt: str, out: Path, s: dict[str, Any]) -> str:
    splits = " / ".join(f"{k} {v:,}" for k, v in s["splits"].items())
    rej = ", ".join(f"{k} {v:,}" for k, v in s["rejects"].items()) or "none"
    return (
        f"convert {fmt}: {s['rows']:,} rows ({splits}) in {s['shards']} shards -> {out}; "
        f"rejects {s['rejected']:,} ({rej}); {s['seconds']:.2f} s, "
        f"{s['rows_per_s'] or 0:,.0f} rows/s"
    )
