"""libSVM / libFM (`label idx:val ...`) and libFFM (`label field:idx:val ...`) lines.

Labels are kept as given (-1/+1, 0/1 or real); any finite number is allowed. Indices are
non-negative integers, values finite floats, fields non-negative integers. A line with only a
label is valid (all features zero). Spaces or tabs separate tokens; CRLF is tolerated.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ravfm.data.formats import _check_variant, first_line
from ravfm.data.parse import Parsed, Reject, drop_rows
from ravfm.data.schemas import LIBSVM
from ravfm.errors import UserError

__all__ = ["LibSVM"]


def _lines(block: bytes, file: str, first: int) -> tuple[pl.Series, np.ndarray, list[Reject]]:
    """The block's lines as a String series (N,), their 0-based indices, and bad_utf8 rejects."""
    n = block.count(b"\n")
    try:
        s = pl.read_csv(
            block, has_header=False, separator="\x1f", quote_char=None, schema={"line": pl.String}
        )["line"]
        if len(s) == n:
            return s.fill_null(""), np.arange(n, dtype=np.int64), []
    except pl.exceptions.PolarsError:
        pass
    good, index, rejects = [], [], []
    for i, line in enumerate(block.split(b"\n")[:-1]):
        try:
            good.append(line.decode("utf-8"))
            index.append(i)
        except UnicodeDecodeError:
            rejects.append(Reject(file, first + i, "bad_utf8", line.rstrip(b"\r")))
    return pl.Series("line", good, dtype=pl.String), np.asarray(index, dtype=np.int64), rejects


class LibSVM:
    name = "libsvm"

    def start(self, file: str, head: bytes, variant: str) -> tuple[str, int]:
        toks = first_line(head).split()
        if not toks:
            raise UserError(f"{file}: the first line is empty; expected `label idx:val ...`")
        colons = {t.count(":") for t in toks[1:]}
        if colons - {1, 2} or len(colons) > 1:
            raise UserError(
                f"{file}: first line {' '.join(toks[:3])!r}... is not libSVM "
                "(label idx:val ...) or libFFM (label field:idx:val ...)"
            )
        found = "libffm" if colons == {2} else "libsvm"
        if variant == "libffm" and found == "libsvm" and not colons:
            found = "libffm"  # a label-only first line says nothing about the variant
        return _check_variant(file, found, variant, ("libsvm", "libffm"), "libsvm"), 0

    def columns(self, variant: str) -> dict[str, str]:
        return dict(LIBSVM.columns)

    def label(self, variant: str) -> str | None:
        return "label"

    def parse(self, block: bytes, *, file: str, first_line: int, variant: str) -> Parsed:
        lines, index, rejects = _lines(block, file, first_line)
        toks = lines.str.replace_all("\t", " ", literal=True).str.strip_chars(" \r").str.split(" ")
        df = pl.DataFrame({"i": np.arange(len(lines), dtype=np.int64), "t": toks})
        label = df["t"].list.first().cast(pl.Float64, strict=False)
        p = Parsed(
            pl.DataFrame({"i": df["i"], "label": label}), index, block, file, first_line, rejects
        )
        ffm = variant == "libffm"
        ex = (
            df.select("i", pl.col("t").list.slice(1))
            .explode("t")
            .filter(pl.col("t").is_not_null() & (pl.col("t") != ""))
        )
        parts = ex["t"].str.split(":")
        n = parts.list.len()
        ex = pl.DataFrame(
            {
                "i": ex["i"],
                "idx": parts.list.get(-2, null_on_oob=True).cast(pl.Int64, strict=False),
                "val": parts.list.get(-1, null_on_oob=True).cast(pl.Float32, strict=False),
                "field": parts.list.get(0).cast(pl.Int32, strict=False) if ffm else None,
                "n": n,
            }
        )
        bad = (
            (ex["n"] != (3 if ffm else 2))
            | ex["idx"].is_null()
            | (ex["idx"] < 0)
            | ex["val"].is_null()
            | ex["val"].is_nan()
            | ex["val"].is_infinite()
        )
        if ffm:
            bad |= ex["field"].is_null() | (ex["field"] < 0)
        bad = bad.fill_null(True)
        bad_rows = np.zeros(len(lines), dtype=bool)
        bad_rows[ex["i"].filter(bad).to_numpy()] = True
        bad_label = (label.is_null() | label.is_nan() | label.is_infinite()).fill_null(True)
        drop_rows(p, bad_label.to_numpy(), "bad_label")
        drop_rows(p, bad_rows[p.df["i"].to_numpy()], "bad_feature")
        p.rejects.sort(key=lambda r: r.line)
        cols = ["idx", "val", "field"] if ffm else ["idx", "val"]
        feats = ex.filter(~bad).group_by("i", maintain_order=True).agg(cols)
        out = p.df.join(feats, on="i", how="left", maintain_order="left")
        out = out.with_columns(pl.col("idx").fill_null([]), pl.col("val").fill_null([]))
        if not ffm:
            out = out.with_columns(pl.lit(None, dtype=pl.List(pl.Int32)).alias("field"))
        p.df = out.select(
            pl.col("label").cast(pl.Float32),
            pl.col("idx").cast(pl.List(pl.Int64)),
            pl.col("val").cast(pl.List(pl.Float32)),
            pl.col("field").cast(pl.List(pl.Int32)),
        )
        return p
