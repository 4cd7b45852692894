"""Line formats (Criteo, Avazu; libSVM lives in libsvm.py): detect the variant, parse a block.

A line format turns one block of whole lines into typed rows in the shard schema and a list
of rejects. `start` looks at the first block of each source file to choose the variant
(e.g. Criteo train with a label, or test without) and how many header lines to skip.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import polars as pl

from ravfm.data.criteo_fast import parse_routed, split_canonical
from ravfm.data.parse import Parsed, drop_rows, parse_delimited, pl_schema
from ravfm.data.schemas import AVAZU, CRITEO, CRITEO_CAT, CRITEO_HEX_DIGITS, schema_for
from ravfm.errors import UserError

__all__ = ["LineFormat", "Criteo", "Avazu", "AVAZU_RAW", "first_line", "civil_days"]


class LineFormat(Protocol):
    name: str

    def start(self, file: str, head: bytes, variant: str) -> tuple[str, int]:
        """(variant, header lines to skip) for a file whose first block is HEAD."""

    def columns(self, variant: str) -> dict[str, str]:
        """Output column -> dtype name for VARIANT."""

    def label(self, variant: str) -> str | None: ...

    def parse(self, block: bytes, *, file: str, first_line: int, variant: str) -> Parsed: ...


def first_line(head: bytes) -> str:
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    return line.decode("utf-8", errors="replace")


def _check_variant(file: str, found: str, asked: str, allowed: tuple[str, ...], fmt: str) -> str:
    if asked not in ("auto", *allowed):
        raise UserError(
            f"--variant {asked!r} is not a {fmt} variant; choose auto or {', '.join(allowed)}"
        )
    if asked != "auto" and asked != found:
        raise UserError(
            f"{file}: looks like {fmt} {found}, not the --variant {asked} asked for; "
            "fix --variant or the source"
        )
    return found


def _bad_label(p: Parsed, col: str) -> Parsed:
    return drop_rows(p, ~p.df[col].is_in([0, 1]).fill_null(False), "bad_label")


class Criteo:
    """Criteo DAC train.txt / 1TB day_N (label + 13 ints + 26 hex strings, tab-separated) and
    DAC test.txt (no label)."""

    name = "criteo"
    _fields = {"train": 40, "test": 39}

    def start(self, file: str, head: bytes, variant: str) -> tuple[str, int]:
        n = first_line(head).count("\t") + 1
        found = {40: "train", 39: "test"}.get(n)
        if found is None:
            raise UserError(
                f"{file}: first line has {n} tab-separated fields; Criteo has 40 "
                "(train, day_N) or 39 (test): is this the right format?"
            )
        return _check_variant(file, found, variant, ("train", "test"), "criteo"), 0

    def columns(self, variant: str) -> dict[str, str]:
        cols = dict(CRITEO.columns)
        if variant == "test":
            del cols["label"]
        return cols

    def label(self, variant: str) -> str | None:
        return None if variant == "test" else "label"

    def parse(self, block: bytes, *, file: str, first_line: int, variant: str) -> Parsed:
        """Canonical lines through the compiled parser, any other line through `parse_polars`."""

        def slow(sub: bytes, first: int) -> Parsed:
            return self.parse_polars(sub, file=file, first_line=first, variant=variant)

        return split_canonical(
            block, has_label=variant != "test", file=file, first_line=first_line, slow=slow
        )

    def parse_routed(self, block: bytes, *, variant: str, codes: np.ndarray) -> list | None:
        """Each split's rows (line r to split codes[r]) when every line is canonical, else None
        (then `parse` takes the block)."""
        if not block.endswith(b"\n"):
            return None
        return parse_routed(block, variant != "test", codes)

    def parse_polars(self, block: bytes, *, file: str, first_line: int, variant: str) -> Parsed:
        """The reference path: Polars read_csv with the exact dtypes, then hex decoding."""
        cols = pl_schema(self.columns(variant))
        cols.update({c: pl.String() for c in CRITEO_CAT})  # hex text, decoded below
        p = parse_delimited(
            block, cols, sep="\t", file=file, first_line=first_line, reasons={"label": "bad_label"}
        )
        p = p if variant == "test" else _bad_label(p, "label")
        return _decode_hex(p)


def _decode_hex(p: Parsed) -> Parsed:
    """C1..C26: 8-hex-digit text -> UInt32 (null stays null); any other text is a bad_hex reject.

    One Polars select decodes every column in parallel; `str.to_integer` alone would accept
    "+1f" or "abc", so the length is checked too (8 digits: f"{v:08x}" gives the text back).
    """
    if not len(p.df):
        p.df = p.df.cast({c: pl.UInt32 for c in CRITEO_CAT})
        return p
    text = {c: pl.col(c) for c in CRITEO_CAT}
    dec = {c: pl.col(f"_{c}") for c in CRITEO_CAT}
    bad = pl.any_horizontal(
        text[c].is_not_null() & (dec[c].is_null() | (text[c].str.len_bytes() != CRITEO_HEX_DIGITS))
        for c in CRITEO_CAT
    )
    out = (
        p.df.lazy()
        .with_columns(
            text[c]
            .str.to_integer(base=16, strict=False)
            .cast(pl.UInt32, strict=False)
            .alias(f"_{c}")
            for c in CRITEO_CAT
        )
        .select(
            bad.alias("_bad"), *(dec[c].alias(c) if c in dec else pl.col(c) for c in p.df.columns)
        )
        .collect()
    )
    p.df = out.drop("_bad")
    return drop_rows(p, out["_bad"], "bad_hex")


_AVAZU_RAW = [
    "id",
    "click",
    "hour",
    *[c for c in AVAZU.columns if c not in ("id", "click", "hour", "hour_of_day", "weekday")],
]
AVAZU_RAW = tuple(_AVAZU_RAW)  # the raw CSV header (train variant), in file order


def civil_days(y: np.ndarray, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of proleptic Gregorian dates (H. Hinnant's days_from_civil).
    y, m, d: (N,) int64 -> (N,) int64."""
    y = y - (m <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    doy = (153 * (m + np.where(m > 2, -3, 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _month_days(y: np.ndarray, m: np.ndarray) -> np.ndarray:
    leap = ((y % 4 == 0) & (y % 100 != 0)) | (y % 400 == 0)
    days = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[np.clip(m, 0, 12)]
    return days + ((m == 2) & leap)


class Avazu:
    """Avazu CTR train/test CSV with header; `hour` is YYMMDDHH (20YY). Adds hour_of_day
    (0-23) and weekday (0 = Monday)."""

    name = "avazu"

    def start(self, file: str, head: bytes, variant: str) -> tuple[str, int]:
        header = first_line(head).split(",")
        if header == _AVAZU_RAW:
            found = "train"
        elif header == [c for c in _AVAZU_RAW if c != "click"]:
            found = "test"
        else:
            raise UserError(
                f"{file}: header {','.join(header)[:80]!r}... is not Avazu's "
                "(id,click,hour,C1,...,C21); is this the right format?"
            )
        return _check_variant(file, found, variant, ("train", "test"), "avazu"), 1

    def columns(self, variant: str) -> dict[str, str]:
        cols = dict(schema_for("avazu").columns)
        if variant == "test":
            del cols["click"]
        return cols

    def label(self, variant: str) -> str | None:
        return None if variant == "test" else "click"

    def parse(self, block: bytes, *, file: str, first_line: int, variant: str) -> Parsed:
        out = self.columns(variant)
        raw = {c: out[c] for c in _AVAZU_RAW if c in out}
        p = parse_delimited(
            block,
            pl_schema(raw),
            sep=",",
            file=file,
            first_line=first_line,
            reasons={"click": "bad_label", "hour": "bad_hour"},
        )
        if variant != "test":
            p = _bad_label(p, "click")
        h = p.df["hour"].fill_null(-1).to_numpy()
        y, mo, d, hh = 2000 + h // 1_000_000, h // 10_000 % 100, h // 100 % 100, h % 100
        ok = (h >= 0) & (mo >= 1) & (mo <= 12) & (d >= 1) & (hh <= 23)
        ok &= d <= _month_days(y, np.where(ok, mo, 1))
        p = drop_rows(p, ~ok, "bad_hour")
        h = p.df["hour"].to_numpy()
        y, mo, d = 2000 + h // 1_000_000, h // 10_000 % 100, h // 100 % 100
        p.df = p.df.with_columns(
            pl.Series("hour_of_day", (h % 100).astype(np.int8)),
            pl.Series("weekday", ((civil_days(y, mo, d) + 3) % 7).astype(np.int8)),
        ).select(list(out))
        return p


FORMATS: dict[str, LineFormat] = {"criteo": Criteo(), "avazu": Avazu()}
