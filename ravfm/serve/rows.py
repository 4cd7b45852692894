"""Request rows -> the typed shard columns `convert` writes, through the dataset's own parser.

A request body is JSON: a list of row objects, [{"I1": 3, "C1": "68fd1e64", ...}, ...], or
one object of column lists, {"I1": [3, null], "C1": ["68fd1e64", ""], ...} (columnar, for
large requests). Values are the raw file's: Criteo's I1..I13 integers and C1..C26 codes of 8
hex digits, Avazu's CSV columns (hour as YYMMDDHH), MovieLens user_id and item_id. A null or
"" is a missing value, as an empty field is in the raw file. The label column (label, click,
rating) may be sent and is ignored.

The rows are rendered as lines of the raw format and parsed by the code `ravfm convert` runs
(ravfm.data.formats, ravfm.data.movielens), so a request row becomes exactly the shard row
that convert makes of the same raw line; MovieLens rows are joined with the checkpoint's side
tables (spec/users.parquet, spec/items.parquet) as convert joins u.user and u.item, and an id
missing from them gets null side features. Each problem is a BadRequest: one line naming the
row (0-based), the column and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ravfm.data.formats import Avazu, Criteo
from ravfm.data.movielens import MovieLens
from ravfm.data.parse import Parsed
from ravfm.errors import UserError
from ravfm.features.side import ITEMS_NAME, USER_COLUMNS, USERS_NAME
from ravfm.features.spec import FeatureSpec
from ravfm.serve.layouts import (
    ABSENT,
    ALLOWED,
    LAYOUTS,
    WANT,
    Absent,
    BadRequest,
    decode_json,
    json_type,
    show,
    valid_text,
)

__all__ = ["RequestReader", "Lines", "BadRequest"]

_EMPTY = {None: ""}  # _EMPTY.get(v, v): a missing value's text, any other value itself


@dataclass(frozen=True)
class Lines:
    """One request written as raw lines: block (n lines of the raw format) and its columns
    (kept to name the row and column of a line the parser rejects)."""

    block: bytes
    n: int
    cols: dict[str, Any]


class RequestReader:
    """A checkpoint's request contract: JSON body -> Polars frame of B rows in the shard schema.

    required: the columns every row must carry (those the feature spec reads, or that the
    parser derives them from: Avazu's hour, MovieLens' user_id and item_id).
    """

    def __init__(self, spec: FeatureSpec, spec_dir: str | Path) -> None:
        if spec.dataset not in LAYOUTS:
            raise UserError(
                f"ravfm serve takes criteo, avazu and movielens checkpoints, not {spec.dataset}; "
                f"score {spec.dataset} data with `ravfm score`"
            )
        self.layout = lay = LAYOUTS[spec.dataset]
        need = set(spec.columns) | ({"hour"} if lay.dataset == "avazu" else set())
        if lay.dataset == "movielens":
            need = {"user_id", "item_id"}
        self.required = tuple(c for c in lay.columns if c in need)
        self.known = set(lay.columns) | set(lay.ignored)
        self.sent = tuple(c for c in lay.columns if c not in lay.fill)
        self.parser = _parser(spec, Path(spec_dir))

    def read(self, body: bytes) -> pl.DataFrame:
        """The rows of a JSON body, parsed as `convert` parses raw lines: (B rows)."""
        frame, errors, _ = self.parse_many([self.prepare(body)])
        if errors[0] is not None:
            raise errors[0]
        return frame

    def prepare(self, body: bytes) -> Lines:
        """A JSON body checked and written as raw lines, ready for `parse_many`."""
        cols, n = self.columns(decode_json(body))
        return Lines(self.render(cols, n), n, cols)

    def columns(self, payload: Any) -> tuple[dict[str, list], int]:
        """Column name -> B values (or ABSENT where a row object lacks it), and B."""
        if isinstance(payload, list):
            return self._from_rows(payload), len(payload)
        if isinstance(payload, dict):
            return self._from_columns(payload)
        raise BadRequest(
            f"the body is {json_type(payload)}; send a list of row objects or an "
            "object of column lists"
        )

    def _from_rows(self, rows: list) -> dict[str, list]:
        if not rows:
            raise BadRequest("the request holds no rows; send at least one row")
        keys: set[str] = set()
        for i, r in enumerate(rows):
            if type(r) is not dict:
                raise BadRequest(
                    f"row {i} is {json_type(r)}, not an object of column values; send a "
                    'list of row objects such as {"I1": 3, "C1": "68fd1e64"}'
                )
            keys.update(r)
        self._check_names(keys)
        cols = {c: [ABSENT] * len(rows) for c in self.sent if c not in keys}
        present = [c for c in self.sent if c in keys]
        try:  # every row carries every column sent: one C-level pass per row
            get = itemgetter(*present, present[0])  # always a tuple, even for one column
            cols.update(zip(present, zip(*map(get, rows))))
        except KeyError:
            cols.update({c: [r.get(c, ABSENT) for r in rows] for c in present})
        return cols

    def _from_columns(self, payload: dict) -> tuple[dict[str, list], int]:
        self._check_names(payload)
        first, n = None, 0
        for c, v in payload.items():
            if type(v) is not list:
                raise BadRequest(
                    f"column {c} is {json_type(v)}, not a list; a columnar body holds one "
                    f'list per column, e.g. {{"{c}": [1, 2]}}'
                )
            if first is None:
                first, n = c, len(v)
            elif len(v) != n:
                raise BadRequest(
                    f"column {c} has {len(v)} value{'s' * (len(v) != 1)} but {first} has {n}; "
                    "send lists of one length"
                )
        if not n:
            raise BadRequest("the request holds no rows; send at least one row")
        missing = [c for c in self.required if c not in payload]
        if missing:
            raise BadRequest(
                f"no column {missing[0]!r}, which the model needs; send it as a list (null "
                "for a missing value)"
            )
        return {c: payload[c] if c in payload else [None] * n for c in self.sent}, n

    def _check_names(self, keys: Any) -> None:
        unknown = sorted(k for k in keys if k not in self.known)
        if unknown:
            lay, k = self.layout, unknown[0]
            side = lay.dataset == "movielens" and k in (*USER_COLUMNS, "genres")
            how = " (the server looks side features up by user_id and item_id)" if side else ""
            raise BadRequest(f"unknown column {k!r}{how}; {lay.dataset} rows take {lay.described}")

    def render(self, cols: dict[str, Any], n: int) -> bytes:
        """The B rows as B lines of the raw format (UTF-8, each ending in a newline; null is
        an empty field, an integer its decimal text)."""
        lay = self.layout
        texts = [
            [lay.fill[c]] * n if c in lay.fill else self._texts(c, cols[c]) for c in lay.columns
        ]
        block = "\n".join(map(lay.sep.join, zip(*texts))) + "\n"
        if block.count("\n") != n or block.count(lay.sep) != n * (len(texts) - 1) or "\r" in block:
            self._find_break(cols)
        try:
            return block.encode()
        except UnicodeEncodeError:
            raise BadRequest(
                "a string holds an unpaired surrogate escape (\\ud800-\\udfff), which is not "
                "text; send UTF-8 text"
            ) from None

    def _texts(self, name: str, values: Any) -> Any:
        """B JSON values of one column -> their raw-file text, after checking their types; an
        absent required value is an error."""
        types = set(map(type, values))
        if Absent in types:
            if name in self.required:
                i = next(i for i, v in enumerate(values) if v is ABSENT)
                raise BadRequest(
                    f'row {i} has no {name!r}, which the model needs; send null (or "") for '
                    "a missing value"
                )
            values = [None if v is ABSENT else v for v in values]
            types = set(map(type, values))
        kind = self.layout.kinds[name]
        if not types <= ALLOWED[kind]:
            i, v = next((i, v) for i, v in enumerate(values) if type(v) not in ALLOWED[kind])
            raise BadRequest(
                f"row {i}: {name} is {show(v)}, {json_type(v)}, not {WANT[kind]}; send "
                "that, or null for a missing value"
            )
        # null -> "" and every value -> its text, in C loops (a dict lookup maps None to "")
        return values if types == {str} else list(map(str, map(_EMPTY.get, values, values)))

    def _find_break(self, cols: dict[str, list]) -> None:
        sep = self.layout.sep
        names = {sep: "tab" if sep == "\t" else "comma", "\n": "line break", "\r": "line break"}
        for c, values in cols.items():
            for i, v in enumerate(values):
                bad = [ch for ch in names if type(v) is str and ch in v]
                if bad:
                    raise BadRequest(
                        f"row {i}: {c} is {show(v)}, which holds a {names[bad[0]]} that a raw "
                        f"{self.layout.dataset} line cannot carry; remove it"
                    )
        raise BadRequest("the rows do not make raw lines; check the values")  # not reached

    def parse_many(self, requests: list[Lines]) -> tuple[pl.DataFrame, list, list[int]]:
        """Parse several requests' lines in one call of the dataset's parser.

        Returns the rows of the requests that parsed (in order; sum(counts) rows), a
        BadRequest or None per request (a rejected line names its request's row and column),
        and each request's row count (0 for a bad one).
        """
        block = requests[0].block if len(requests) == 1 else b"".join(r.block for r in requests)
        p: Parsed = self.parser.parse(
            block, file="request", first_line=0, variant=self.layout.variant
        )
        errors: list = [None] * len(requests)
        counts = [r.n for r in requests]
        if not p.rejects:
            return p.df, errors, counts
        starts = np.cumsum([0] + counts)
        for rej in p.rejects:
            k = int(np.searchsorted(starts, rej.line, side="right")) - 1
            if errors[k] is None:
                errors[k] = self._explain(rej.line - int(starts[k]), rej.reason, requests[k].cols)
                counts[k] = 0
        owner = np.searchsorted(starts, p.index, side="right") - 1  # each parsed row's request
        keep = np.asarray([errors[k] is None for k in owner], dtype=bool)
        return p.df.filter(pl.Series(keep)), errors, counts

    def _explain(self, i: int, reason: str, cols: dict[str, list]) -> BadRequest:
        """The BadRequest for row i of a request, rejected by the parser for `reason`."""
        if reason == "bad_hour":
            return BadRequest(
                f"row {i}: hour is {show(cols['hour'][i])}, not a time YYMMDDHH as in the raw "
                "file (e.g. 14102100); send one"
            )
        want = {"bad_hex": "hex", "bad_int": "int"}.get(reason)
        for c in cols:
            v = cols[c][i]
            if (
                self.layout.kinds[c] == want
                and v not in (None, "", ABSENT)
                and not valid_text(want, str(v))
            ):
                return BadRequest(
                    f"row {i}: {c} is {show(v)}, not {WANT[want]}; send that, or null for a "
                    "missing value"
                )
        return BadRequest(
            f"row {i} is not a valid {self.layout.dataset} row ({reason}); send the values as "
            "they are in the raw file"
        )


def _side(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path.is_file() else None


def _parser(spec: FeatureSpec, spec_dir: Path) -> Any:
    """The dataset's line parser; for MovieLens one joining the checkpoint's side tables."""
    if spec.dataset == "criteo":
        return Criteo()
    if spec.dataset == "avazu":
        return Avazu()
    ml = MovieLens.from_tables(_side(spec_dir / USERS_NAME), _side(spec_dir / ITEMS_NAME))
    have = ml.columns("")
    missing = [c for c in spec.columns if c not in have]
    if missing:
        table = USERS_NAME if missing[0] in USER_COLUMNS else ITEMS_NAME
        raise UserError(
            f"{spec_dir} has no {table} with {missing[0]!r}, which the model reads; run "
            f"`ravfm stats` on the run's shards with this ravfm and copy {USERS_NAME} and "
            f"{ITEMS_NAME} from its output into {spec_dir}"
        )
    return ml
