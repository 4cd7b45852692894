"""The compiled Criteo parser against the Polars path: same rows, same line indexes, same rejects."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from ravfm.data.criteo_fast import parse_canonical
from ravfm.data.formats import Criteo

C = Criteo()


def _line(rng: np.random.Generator, label: bool) -> str:
    ints = [
        "" if rng.random() < 0.3 else str(int(rng.integers(-3, 10 ** int(rng.integers(1, 12)))))
        for _ in range(13)
    ]
    cats = ["" if rng.random() < 0.2 else f"{int(rng.integers(0, 2**32)):08x}" for _ in range(26)]
    return "\t".join(([str(int(rng.integers(0, 2)))] if label else []) + ints + cats)


def _same(block: bytes, variant: str = "train") -> None:
    fast = C.parse(block, file="f", first_line=5, variant=variant)
    ref = C.parse_polars(block, file="f", first_line=5, variant=variant)
    assert_frame_equal(fast.df, ref.df)
    np.testing.assert_array_equal(fast.index, ref.index)
    assert [(r.line, r.reason, r.raw) for r in fast.rejects] == [
        (r.line, r.reason, r.raw) for r in ref.rejects
    ]


@pytest.mark.parametrize("variant", ["train", "test"])
def test_canonical_lines_parse_like_polars(variant):
    rng = np.random.default_rng(0)
    block = "".join(_line(rng, variant == "train") + "\n" for _ in range(3000)).encode()
    df, good, starts = parse_canonical(block, variant == "train")
    assert len(good) == 3000 and len(starts) == 3001  # every line took the compiled path
    _same(block, variant)


def _fields(
    label: str = "1", ints: dict | None = None, cats: dict | None = None, n: int = 39
) -> str:
    """A train line from its label and a few non-empty fields (the rest empty)."""
    row = [label] + [(ints or {}).get(i, "") for i in range(13)]
    row += [(cats or {}).get(j, "") for j in range(26)]
    return "\t".join(row[: n + 1] + [""] * (n + 1 - len(row)))


ODD_LINES = [
    _fields(ints={0: "+5"}),  # "+5": Polars decides
    _fields(ints={1: "1" * 19}),  # 19 digits
    _fields(ints={2: "-"}),  # a lone minus
    _fields(label="2"),  # label outside 0/1
    _fields(label="00"),  # "00" is 0 for Polars
    _fields(cats={0: "abc"}),  # bad hex
    _fields(cats={3: "0000000g"}),  # bad hex digit
    _fields(cats={25: "000000001"}),  # 9 digits
    _fields(cats={4: "ABCDEF01"}),  # upper case: canonical
    _fields(ints={0: "-0", 1: "007"}),  # -0 and leading zeros: canonical
    _fields(n=38),  # one field short
    _fields(n=40),  # one field long
    _fields(cats={25: "0000000a"}) + "\r",  # CRLF
    _fields(ints={3: "1 "}),  # trailing space
]


def test_odd_lines_go_to_polars_and_come_back_in_order():
    rng = np.random.default_rng(1)
    lines = [_line(rng, True) for _ in range(200)]
    for k, odd in enumerate(ODD_LINES):
        lines.insert(7 + 13 * k, odd)
    block = ("\n".join(lines) + "\n").encode()
    block = block.replace(lines[50].encode(), b"1\t\xff\xfe" + b"\t" * 38)  # bad UTF-8
    _same(block)
    fast = C.parse(block, file="f", first_line=5, variant="train")
    assert {r.reason for r in fast.rejects} >= {"bad_label", "bad_hex", "bad_field_count"}


def test_a_block_of_only_odd_lines():
    _same(("\n".join(ODD_LINES) + "\n").encode())


def test_parsed_frame_has_the_shard_dtypes():
    rng = np.random.default_rng(2)
    df, _, _ = parse_canonical((_line(rng, True) + "\n").encode() * 3, True)
    assert df.schema == pl.Schema(
        {"label": pl.Int8, **{f"I{i}": pl.Int64 for i in range(1, 14)}}
        | {f"C{i}": pl.UInt32 for i in range(1, 27)}
    )


def test_a_last_line_without_newline_is_parsed_too():
    rng = np.random.default_rng(3)
    block = "\n".join(_line(rng, True) for _ in range(5)).encode()  # no final newline
    fast = C.parse(block, file="f", first_line=1, variant="train")
    ref = C.parse_polars(block + b"\n", file="f", first_line=1, variant="train")
    assert_frame_equal(fast.df, ref.df)
    with pytest.raises(ValueError, match="newline"):
        parse_canonical(block, True)


@pytest.mark.parametrize("variant", ["train", "test"])
def test_routed_parse_is_the_parse_filtered_by_split(variant):
    rng = np.random.default_rng(4)
    block = "".join(_line(rng, variant == "train") + "\n" for _ in range(2000)).encode()
    codes = rng.integers(0, 3, 2000).astype(np.int8)
    parts = C.parse_routed(block, variant=variant, codes=codes)
    ref = C.parse_polars(block, file="f", first_line=1, variant=variant).df
    for k in range(3):
        assert_frame_equal(pl.from_arrow(parts[k]), ref.filter(pl.Series(codes == k)))


def test_routed_parse_declines_a_block_with_an_odd_line():
    rng = np.random.default_rng(5)
    lines = [_line(rng, True) for _ in range(50)]
    codes = np.zeros(51, np.int8)
    odd_lines = [x for x in ODD_LINES if not len(parse_canonical((x + "\n").encode(), True)[1])]
    assert len(odd_lines) == len(ODD_LINES) - 2  # upper-case hex, "-0" and "007" are canonical
    for odd in odd_lines:
        block = ("\n".join(lines[:20] + [odd] + lines[20:]) + "\n").encode()
        assert C.parse_routed(block, variant="train", codes=codes) is None
    assert (
        C.parse_routed(b"\n".join(x.encode() for x in lines), variant="train", codes=codes) is None
    )
