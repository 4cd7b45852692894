"""The scored output of `ravfm score`: part files, a manifest written after them, a success
marker written last. Object stores have no rename, so completeness is what the marker and the
manifest say, never what happens to be in the directory:

    part-FFFFF-CCCC.parquet   the scored rows of one input part (input order within the file)
    _manifest.json            every part with its rows, bytes and SHA-256, the checkpoint, columns
    _SUCCESS                  written last: the output is complete

A run that fails leaves no _SUCCESS (and removes the parts it wrote, when it can), so nothing
looks complete; an output that holds _SUCCESS is never written into again. `read_scores`
checks the marker and every part against the manifest before returning the rows.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ravfm.errors import UserError
from ravfm.storage import Store, open_url, verify_files

__all__ = [
    "MANIFEST",
    "SUCCESS",
    "prepare_output",
    "write_part",
    "publish",
    "discard",
    "read_scores",
    "PARQUET_WRITE",
]

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
# Page checksums let a reader find damage inside a data page (ravfm reads with verification).
PARQUET_WRITE = {"compression": "zstd", "write_page_checksum": True}
_OURS = ("part-", MANIFEST, SUCCESS, ".part-")


def prepare_output(output: str) -> Store:
    """The output Store, after refusing a complete earlier output (or foreign files) and
    removing an incomplete earlier attempt of ours (parts without _SUCCESS)."""
    store = Store(output)
    if store.exists() and not store.isdir():
        raise UserError(f"--output {output} is a file; pass a directory")
    names = store.list()
    if SUCCESS in names:
        raise UserError(
            f"--output {output} already holds a complete scored output; pass a new directory "
            "(scoring never overwrites one)"
        )
    foreign = [n for n in names if not n.startswith(_OURS)]
    if foreign:
        raise UserError(
            f"--output {output} already holds other files ({foreign[0]}, ...); pass a new or "
            "empty directory"
        )
    if names:
        print(f"ravfm score: removing an incomplete earlier output in {output}", flush=True)
        for n in names:
            store.remove(n)
    store.makedirs()
    return store


def write_part(
    scorer: Any, item: dict, output: str, columns: list[str], batch_size: int
) -> dict[str, Any]:
    """Score one part (item: {"path", "groups", "part"}) into output/part: its row groups read
    batch by batch (page checksums verified), scored, and written in the same row order.
    Returns {"part", "rows", "bytes", "sha256"} ({"rows": 0} and no file when it is empty)."""
    store = Store(output)
    name = str(item["part"])
    rows, sink = 0, pa.BufferOutputStream()
    writer = None
    try:
        with open_url(str(item["path"])) as src:
            pf = pq.ParquetFile(src, page_checksum_verification=True)
            for batch in pf.iter_batches(
                batch_size, row_groups=[int(g) for g in item["groups"]], columns=columns
            ):
                out = scorer(pa.Table.from_batches([batch]))
                writer = writer or pq.ParquetWriter(sink, out.schema, **PARQUET_WRITE)
                writer.write_table(out)
                rows += out.num_rows
    except (OSError, pa.ArrowException) as e:
        raise UserError(
            f"{item['path']}: row groups {list(item['groups'])} cannot be read "
            f"({str(e).splitlines()[0]}); the file is damaged: re-convert it"
        ) from None
    if writer is None:
        return {"part": name, "rows": 0}
    writer.close()
    data = sink.getvalue().to_pybytes()
    size, sha = store.write_bytes(name, data)
    return {"part": name, "rows": rows, "bytes": size, "sha256": sha}


def publish(store: Store, parts: list[dict], meta: dict[str, Any]) -> None:
    """The manifest (every non-empty part, in order), then the success marker."""
    listed = [p for p in sorted(parts, key=lambda p: p["part"]) if p["rows"]]
    store.write_json(MANIFEST, {**meta, "parts": listed, "rows": sum(p["rows"] for p in listed),
                                "written_at": time.time()})  # fmt: skip
    store.write_bytes(SUCCESS, b"")


def discard(store: Store, parts: list[str]) -> None:
    """Best effort after a failure: remove the parts this run wrote (there is no _SUCCESS)."""
    for name in parts:
        try:
            store.remove(name)
        except OSError:
            pass


def read_scores(output: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of a complete scored output, in order, after checking _SUCCESS and every part
    against the manifest (size and SHA-256); one UserError naming what is wrong otherwise."""
    store = Store(output)
    if not store.exists(SUCCESS):
        raise UserError(
            f"{output} is not a complete scored output (no {SUCCESS}: the run failed or is "
            "still writing); score again into a new directory"
        )
    manifest = store.read_json(MANIFEST)
    files = {p["part"]: {"bytes": p["bytes"], "sha256": p["sha256"]} for p in manifest["parts"]}
    verify_files(store, files, f"scored output {output}")
    tables = []
    for p in manifest["parts"]:
        with store.open(p["part"]) as f:
            tables.append(pq.read_table(f, columns=columns, page_checksum_verification=True))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables)
