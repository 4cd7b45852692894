"""`ravfm convert`: raw Criteo / Avazu / MovieLens / libSVM files -> Parquet shards + _index.json.

Pipeline: a reader thread opens each source file (decompressing as a stream) and cuts it into
blocks of whole lines; the main thread parses each block with its format's explicit schema
(bad lines go to `_rejects/rejects.jsonl` with file, line number, reason and raw text; the
Criteo parser also splits canonical blocks itself); a router thread sends rows to
train/valid/test (ravfm.data.route), whose writer threads append them to zstd Parquet shards.
Peak memory is a few blocks plus about three row groups per split (one filling, two queued),
whatever the input size.

Output is built in a temporary directory beside OUT and renamed into place at the end, so a
failed or interrupted conversion leaves OUT as it was. Re-converting into an OUT that already
holds this dataset: if the source fingerprint (URL, size, mtime/etag of every file) and the
options are unchanged, the conversion is skipped as up to date; otherwise OUT is replaced.
An OUT holding a different dataset (another format or source URL) or non-ravfm files is an
error, never overwritten.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, Any

import ravfm
from ravfm.data.criteo_fast import count_lines
from ravfm.data.formats import FORMATS, LineFormat
from ravfm.data.index import (
    FORMAT_VERSION,
    REJECTS_DIR,
    SPLITS,
    read_index,
    write_index,
)
from ravfm.data.libsvm import LibSVM
from ravfm.data.movielens import MovieLens
from ravfm.data.outdir import out_state, summarize, summary_line, swap_into
from ravfm.data.route import Router, split_rule
from ravfm.data.schemas import ROW_COLUMN, SCHEMA_REVISION
from ravfm.data.shards import ROW_GROUP_ROWS, RejectLog, ShardSet
from ravfm.data.sources import (
    BLOCK_BYTES,
    fingerprint,
    iter_blocks,
    open_members,
    prefetch,
    resolve,
)
from ravfm.errors import UserError
from ravfm.runtime import old_objects_frozen

__all__ = ["convert", "FORMAT_NAMES"]

FORMAT_NAMES = ("criteo", "avazu", "movielens", "libsvm")
_EARLY_LINES = 10_000  # after this many lines, stop at once if more than half were rejected


def _blocks(
    parts: Iterator[tuple[str, IO[bytes], str | None]],
) -> Iterator[tuple[str, str | None, bool, bytes]]:
    """(file, fixed split, first block of its file?, block) over every part, in order."""
    try:
        for file, stream, fixed in parts:
            first = True
            for block in iter_blocks(stream, BLOCK_BYTES):
                yield file, fixed, first, block
                first = False
    except UserError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise UserError(
            f"cannot open the source ({type(e).__name__}: {e}); is it the archive "
            "or compression its name says?"
        ) from None


def _line_parts(files: list) -> Iterator[tuple[str, IO[bytes], str | None]]:
    for sf in files:
        for name, stream in open_members(sf):
            yield name, stream, None


def _with_row(columns: dict[str, str]) -> dict[str, str]:
    return {**columns, ROW_COLUMN: "Int64"}


def convert(
    fmt: str,
    src: str,
    out: str | os.PathLike,
    *,
    rows_per_shard: int = 1_000_000,
    split: str = "hash",
    split_ratios: tuple[float, ...] = (8.0, 1.0, 1.0),
    seed: int = 0,
    max_reject_rate: float = 0.001,
    variant: str = "auto",
) -> dict[str, Any]:
    """Convert SRC (path, glob or fsspec URL; maybe compressed) in format FMT into shards in OUT.

    split: "hash" (a seeded hash of each row's number, train:valid:test = split_ratios; see
    ravfm.data.split), "train" / "valid" / "test" (every row into that split, e.g. a separate
    test file), or a MovieLens 100K standard split u1..u5, ua, ub (uX.base -> train, uX.test
    -> test; valid stays empty so the standard protocol is kept). variant: "auto" or the
    format's variant (criteo / avazu: train, test; libsvm: libsvm, libffm; movielens: ml-100k,
    ml-1m, ml-10m, ml-20m, ml-25m, latest). Prints one summary line and returns the summary:
    rows per split, rejects by reason, seconds, rows/s. See the module docstring for the
    output contract and re-run rules.
    """
    t0 = time.perf_counter()
    if fmt not in FORMAT_NAMES:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMAT_NAMES)}")
    if rows_per_shard < 1:
        raise UserError(f"--rows-per-shard must be positive, got {rows_per_shard}")
    if not 0 <= max_reject_rate <= 1:
        raise UserError(f"--max-reject-rate must be in [0, 1], got {max_reject_rate}")
    if "://" in str(out) and not str(out).startswith("file://"):
        raise UserError(f"--out {out}: write shards to a local directory, then upload it")
    out = Path(str(out).removeprefix("file://")).absolute()
    rule = split_rule(fmt, split, tuple(split_ratios), seed)
    files = resolve(src, dirs=fmt == "movielens")
    if fmt == "movielens":
        ml = MovieLens(files[0], variant)
        parser: LineFormat = ml
        parts = ml.parts(split) if rule["kind"] == "standard" else ml.parts("hash")
        fp = {
            "url": src,
            "files": ml.fingerprint_files() if files[0].size is None else [files[0].fingerprint()],
        }
    else:
        parser = LibSVM() if fmt == "libsvm" else FORMATS[fmt]
        parts = _line_parts(files)
        fp = fingerprint(src, files)
    if all(f.get("size") == 0 for f in fp["files"]):
        raise UserError(f"{src}: the source is empty; check the path or URL")
    options = {
        "schema_revision": SCHEMA_REVISION,
        "variant": variant,
        "split": rule,
        "rows_per_shard": rows_per_shard,
        "max_reject_rate": max_reject_rate,
    }
    state = out_state(out, fmt, src, fp, options)
    if state == "up-to-date":
        index = read_index(out)
        print(
            f"convert {fmt}: {out} is up to date with {src} (same source fingerprint and "
            f"options); nothing to do",
        )
        return {**summarize(index, 0.0), "skipped": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with old_objects_frozen():
            index = _run(
                parser,
                parts,
                tmp,
                fmt=fmt,
                src=src,
                variant=variant,
                rule=rule,
                fp=fp,
                options=options,
                rows_per_shard=rows_per_shard,
                max_reject_rate=max_reject_rate,
                out=out,
            )
        swap_into(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = summarize(index, time.perf_counter() - t0)
    print(summary_line(fmt, out, summary))
    return {**summary, "skipped": False}


def _run(
    parser: LineFormat,
    parts: Iterator,
    tmp: Path,
    *,
    fmt: str,
    src: str,
    variant: str,
    rule: dict[str, Any],
    fp: dict[str, Any],
    options: dict[str, Any],
    rows_per_shard: int,
    max_reject_rate: float,
    out: Path,
) -> dict[str, Any]:
    rejects = RejectLog(tmp)
    shards: ShardSet | None = None
    router: Router | None = None
    chosen: str | None = None
    lines = row_base = 0
    line_no = 1
    pending: Future | None = None
    stopped = False
    routed = getattr(parser, "parse_routed", None)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ravfm-write") as pool:
        try:
            for file, fixed, first, block in prefetch(lambda: _blocks(parts)):
                if first:
                    line_no = 1
                    v, skip = parser.start(file, block, variant)
                    if chosen is not None and v != chosen:
                        raise UserError(
                            f"{file}: is {fmt} {v} but the earlier files are {chosen}; "
                            "convert them separately"
                        )
                    chosen = v
                    if shards is None:
                        shards = ShardSet(tmp, _with_row(parser.columns(v)), rows_per_shard)
                        router = Router(shards, rule)
                    for _ in range(skip):
                        cut = block.find(b"\n") + 1
                        block, line_no = block[cut:], line_no + 1
                    if not block:
                        continue
                n = count_lines(block)
                by_split = None
                if routed is not None:  # the format parses and routes in one pass
                    codes = router.codes(row_base, n, fixed)
                    by_split = routed(block, variant=chosen, codes=codes)
                if by_split is None:
                    p = parser.parse(block, file=file, first_line=line_no, variant=chosen)
                    rejects.add(sorted(p.rejects, key=lambda r: r.line))
                    job = (router, p, row_base, fixed)
                else:
                    job = (router.add_routed, by_split, codes, row_base)
                if pending is not None:
                    pending.result()
                pending = pool.submit(*job)
                lines += n
                row_base += n
                line_no += n
                if lines >= _EARLY_LINES and rejects.total * 2 > lines and max_reject_rate < 0.5:
                    stopped = True  # mostly bad: the wrong format or a corrupt file; stop now
                    break
            if pending is not None:
                pending.result()
        except BaseException:
            if pending is not None:
                wait([pending])  # the router may still be handing rows to the shard writers
            if shards is not None:
                shards.abort()  # no writer thread may touch tmp after the caller removes it
            raise
        finally:
            rejects.close()
    if lines == 0 or shards is None:
        raise UserError(f"{src}: the source holds no data lines; check the path or URL")
    shard_list = shards.close()
    bad = rejects.total
    if bad > max_reject_rate * lines:
        keep = Path(f"{out}.rejects")
        shutil.rmtree(keep, ignore_errors=True)
        shutil.move(str(tmp / REJECTS_DIR), keep)
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(rejects.counts.items()))
        raise UserError(
            f"{src}: {bad} of {lines} lines{' read' if stopped else ''} rejected ({bad / lines:.4%} > "
            f"--max-reject-rate {max_reject_rate:.4%}; {reasons}); see "
            f"{keep}/rejects.jsonl, fix the source or raise --max-reject-rate"
        )
    columns = _with_row(parser.columns(chosen))
    splits = {
        s: {"rows": router.rows[s], "shards": sum(x["split"] == s for x in shard_list)}
        for s in SPLITS
    }
    index = {
        "format_version": FORMAT_VERSION,
        "dataset": fmt,
        "variant": chosen,
        "schema": columns,
        "label": parser.label(chosen),
        "shards": shard_list,
        "splits": splits,
        "split_rule": rule,
        "rows": sum(s["rows"] for s in splits.values()),
        "lines": lines,
        "rejects": dict(sorted(rejects.counts.items())),
        "rejected": bad,
        "rejects_file": f"{REJECTS_DIR}/rejects.jsonl" if bad else None,
        "source": fp,
        "options": options,
        "row_group_rows": min(ROW_GROUP_ROWS, rows_per_shard),
        "compression": "zstd",
        "ravfm_version": ravfm.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_index(tmp, index)
    return index
