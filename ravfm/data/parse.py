"""Parse one block of delimited lines with an explicit schema, setting bad lines aside.

Fast path: Polars `read_csv` on the block's bytes with the exact dtypes, after a vectorised
check that the block holds exactly (fields - 1) separators per line (Polars pads short rows
with nulls instead of failing, and fails on long ones, so the two checks together catch every
wrong field count). When either check fails, the tolerant path splits the block into lines in
Python, rejects undecodable and wrong-length lines, reads the rest as strings and casts each
column non-strictly: a value that was present but did not cast is a reject, by column reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import polars as pl

__all__ = ["Reject", "Parsed", "parse_delimited", "drop_rows", "pl_dtype", "pl_schema"]

_LIST = re.compile(r"^List\((.+)\)$")


def pl_dtype(name: str) -> pl.DataType:
    """Polars dtype from its name as stored in schemas.py and _index.json ("List(Int64)")."""
    m = _LIST.match(name)
    if m:
        return pl.List(pl_dtype(m.group(1)))
    return getattr(pl, name)()


def pl_schema(columns: dict[str, str]) -> dict[str, pl.DataType]:
    return {c: pl_dtype(t) for c, t in columns.items()}


@dataclass(frozen=True)
class Reject:
    """One line set aside: where it was (file, 1-based line), why, and its raw bytes."""

    file: str
    line: int
    reason: str
    raw: bytes


@dataclass
class Parsed:
    """Rows parsed from one block. df: (N rows); index: (N,) 0-based line index in block."""

    df: pl.DataFrame
    index: np.ndarray
    block: bytes
    file: str
    first_line: int
    rejects: list[Reject] = field(default_factory=list)
    _starts: np.ndarray | None = None

    def raw_line(self, i: int) -> bytes:
        """Raw bytes of line i of the block (without its newline)."""
        if self._starts is None:
            nl = np.flatnonzero(np.frombuffer(self.block, dtype=np.uint8) == 10)
            self._starts = np.concatenate(([0], nl + 1))
        a, b = self._starts[i], self._starts[i + 1] - 1
        return self.block[a:b].rstrip(b"\r")

    @property
    def lines(self) -> np.ndarray:
        """(N,) 1-based line numbers in the file of the parsed rows."""
        return self.index + self.first_line


def drop_rows(p: Parsed, bad: np.ndarray | pl.Series, reason: str) -> Parsed:
    """Move the rows where BAD is true (N,) bool from p.df to p.rejects with REASON."""
    bad = bad.to_numpy() if isinstance(bad, pl.Series) else np.asarray(bad)
    bad = np.asarray(bad, dtype=bool)
    if not bad.any():
        return p
    for i in p.index[bad]:
        p.rejects.append(Reject(p.file, int(i) + p.first_line, reason, p.raw_line(int(i))))
    keep = ~bad
    p.df = p.df.filter(pl.Series(keep))
    p.index = p.index[keep]
    return p


def parse_delimited(
    block: bytes,
    columns: dict[str, pl.DataType],
    *,
    sep: str,
    file: str,
    first_line: int,
    reasons: dict[str, str] | None = None,
) -> Parsed:
    """Parse BLOCK (whole lines, each ending in \\n) into len(columns) typed columns.

    reasons maps a column to the reject reason used when its value does not cast (default
    "bad_int" for integer columns, "bad_number" for floats, "bad_value" otherwise).
    """
    n_lines = block.count(b"\n")
    arr = np.frombuffer(block, dtype=np.uint8)
    if np.count_nonzero(arr == ord(sep)) == n_lines * (len(columns) - 1):
        try:
            df = pl.read_csv(
                block,
                has_header=False,
                separator=sep,
                quote_char=None,
                schema=columns,
                new_columns=list(columns),
            )
            if len(df) == n_lines:
                return Parsed(df, np.arange(n_lines, dtype=np.int64), block, file, first_line)
        except (pl.exceptions.ComputeError, pl.exceptions.PolarsError):
            pass
    return _parse_tolerant(
        block, columns, sep=sep, file=file, first_line=first_line, reasons=reasons or {}
    )


def _reason(col: str, dtype: pl.DataType, reasons: dict[str, str]) -> str:
    if col in reasons:
        return reasons[col]
    if dtype.is_integer():
        return "bad_int"
    return "bad_number" if dtype.is_float() else "bad_value"


def _parse_tolerant(
    block: bytes,
    columns: dict[str, pl.DataType],
    *,
    sep: str,
    file: str,
    first_line: int,
    reasons: dict[str, str],
) -> Parsed:
    rejects: list[Reject] = []
    good: list[bytes] = []
    index: list[int] = []
    want = len(columns) - 1
    bsep = sep.encode()
    lines = block.split(b"\n")
    lines.pop()  # the block ends with a newline: the last piece is empty
    for i, line in enumerate(lines):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            rejects.append(Reject(file, first_line + i, "bad_utf8", line.rstrip(b"\r")))
            continue
        if line.count(bsep) != want:
            rejects.append(Reject(file, first_line + i, "bad_field_count", line.rstrip(b"\r")))
            continue
        good.append(line)
        index.append(i)
    idx = np.asarray(index, dtype=np.int64)
    if not good:
        empty = pl.DataFrame(schema=columns)
        return Parsed(empty, idx, block, file, first_line, rejects)
    raw = pl.read_csv(
        b"\n".join(good) + b"\n",
        has_header=False,
        separator=sep,
        quote_char=None,
        schema={c: pl.String for c in columns},
        new_columns=list(columns),
    )
    p = Parsed(raw, idx, block, file, first_line, rejects)
    for col, dtype in columns.items():
        if dtype != pl.String:
            s = p.df[col].str.strip_chars(" \r")
            bad = s.cast(dtype, strict=False).is_null() & s.is_not_null() & (s != "")
            drop_rows(p, bad.to_numpy(), _reason(col, dtype, reasons))
    p.rejects.sort(key=lambda r: r.line)
    p.df = _cast_all(p.df, columns)
    return p


def _cast_all(df: pl.DataFrame, columns: dict[str, pl.DataType]) -> pl.DataFrame:
    exprs = []
    for col, dtype in columns.items():
        e = pl.col(col)
        if dtype != pl.String:
            e = e.str.strip_chars(" \r").replace("", None).cast(dtype, strict=False)
        exprs.append(e.alias(col))
    return df.select(exprs)
