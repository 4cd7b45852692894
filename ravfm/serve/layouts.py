"""What a request row is for each dataset: its raw line layout, and the request errors.

A Layout says how the server writes a request row as a line of the dataset's raw file (the
fields in order, their kinds, the separator, the parser variant), so that `rows.RequestReader`
can parse it with the code `ravfm convert` runs. BadRequest is the one error a request gets:
HTTP 400 (413 for a body over the size limit) with one line naming the problem and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from ravfm.data.formats import AVAZU_RAW
from ravfm.data.schemas import CRITEO_CAT, CRITEO_INT
from ravfm.errors import UserError

__all__ = [
    "BadRequest",
    "TooLarge",
    "Layout",
    "LAYOUTS",
    "ABSENT",
    "ALLOWED",
    "WANT",
    "decode_json",
    "show",
    "json_type",
    "valid_text",
]


class BadRequest(UserError):
    """A request the server refuses (HTTP `status`), with one line saying what to fix."""

    status = 400


class TooLarge(BadRequest):
    status = 413


class Absent:
    """A column a row object does not carry (null is a missing value; absent is not sent)."""


ABSENT = Absent()
ALLOWED = {"int": {int, str, type(None)}, "hex": {str, type(None)}, "str": {str, int, type(None)}}
WANT = {
    "int": "an integer",
    "hex": 'a code of 8 hex digits as in the raw file (e.g. "68fd1e64")',
    "str": "a string (or an integer)",
}


@dataclass(frozen=True)
class Layout:
    """One dataset's raw line as the server renders it.

    columns: the fields of the line, in order; kinds: "int", "hex" or "str" per column;
    fill: the text of a field the request never sets (MovieLens' rating, a placeholder the
    prediction does not read); ignored: columns a request may send that are not used.
    """

    dataset: str
    columns: tuple[str, ...]
    kinds: dict[str, str]
    sep: str
    variant: str
    fill: dict[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    described: str = ""
    example: dict[str, Any] = field(default_factory=dict)  # a valid row (others null)


_AVAZU_LINE = tuple(c for c in AVAZU_RAW if c != "click")
LAYOUTS = {
    "criteo": Layout(
        "criteo",
        CRITEO_INT + CRITEO_CAT,
        {**{c: "int" for c in CRITEO_INT}, **{c: "hex" for c in CRITEO_CAT}},
        "\t",
        "test",
        ignored=("label",),
        described="I1..I13 and C1..C26 (label is ignored)",
        example={"I1": 1, "I2": 5, "C1": "68fd1e64", "C2": "80e26c9b"},
    ),
    "avazu": Layout(
        "avazu",
        _AVAZU_LINE,
        {c: "int" if c == "hour" else "str" for c in _AVAZU_LINE},
        ",",
        "test",
        ignored=("click",),
        described="id, hour, C1, banner_pos, ..., C21 as in the raw CSV (click is ignored)",
        example={"hour": 14102100, "C1": "1005", "banner_pos": "0", "site_id": "1fbe01fe"},
    ),
    "movielens": Layout(
        "movielens",
        ("user_id", "item_id", "rating", "timestamp"),
        {"user_id": "int", "item_id": "int", "rating": "int", "timestamp": "int"},
        "\t",
        "ml-100k",
        fill={"rating": "1"},
        ignored=("rating",),
        described="user_id and item_id (timestamp is optional, rating is ignored)",
        example={"user_id": 196, "item_id": 242},
    ),
}


def decode_json(body: bytes) -> Any:
    """The request's JSON value; a BadRequest when the body is not JSON."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at character {e.pos}" if isinstance(e, json.JSONDecodeError) else ""
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise BadRequest(
            f"the body is not JSON ({msg}{where}); send a list of row objects or an "
            "object of column lists"
        ) from None


def show(v: Any) -> str:
    """A value as JSON, cut to 40 characters, for an error line."""
    s = json.dumps(v) if not isinstance(v, Absent) else "absent"
    return s if len(s) <= 40 else s[:37] + "..."


def json_type(v: Any) -> str:
    """The JSON type of a decoded value, with its article ("an integer", "a list")."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if isinstance(v, list):
        return "a list"
    return names.get(type(v), "an object" if isinstance(v, dict) else "null")


def valid_text(kind: str, text: str) -> bool:
    """Whether `text` parses as the raw file's `kind` (the parser's own rules)."""
    if kind == "hex":
        return len(text) == 8 and all(ch in "0123456789abcdefABCDEF" for ch in text)
    s = pl.Series([text]).str.strip_chars(" \r").cast(pl.Int64, strict=False)
    return s[0] is not None
