"""MovieLens ratings with side features, from a directory or a .zip (local or any URL).

Layouts (the variant, auto-detected from the files present):
  ml-100k      u.data (tab) + u.user (age, gender, occupation, zip) + u.item (19 genre flags),
               Latin-1; standard splits u1..u5 and ua/ub (uX.base -> train, uX.test -> test)
  ml-1m        ratings.dat / users.dat / movies.dat, `::`-separated, Latin-1
  ml-10m       ratings.dat / movies.dat (no user features)
  ml-20m, ml-25m, latest
               ratings.csv (header) + movies.csv (quoted titles, `|`-separated genres)
Ratings stream in blocks like any line format; the small user and movie tables are read
whole and joined onto each block. Unknown users or movies keep null side features.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import IO, Any

import fsspec
import polars as pl

from ravfm.data.parse import Parsed, Reject, drop_rows, parse_delimited, pl_schema
from ravfm.data.schemas import MOVIELENS
from ravfm.data.sources import SourceFile
from ravfm.errors import UserError

__all__ = ["MovieLens", "STANDARD_SPLITS", "VARIANTS"]

STANDARD_SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")
VARIANTS = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "latest")
_GENRES_100K = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
_RATING = {"user_id": "Int64", "item_id": "Int64", "rating": "Float32", "timestamp": "Int64"}
_SEP = "\x1f"  # `::` becomes one byte so Polars can split on it


class MovieLens:
    """One MovieLens source: finds the files, loads side tables, parses rating blocks."""

    name = "movielens"

    def __init__(self, sf: SourceFile, variant: str = "auto") -> None:
        if sf.path.lower().endswith(".zip"):
            self._fs = fsspec.filesystem("zip", fo=sf.fs.open(sf.path, "rb"))
            root = ""
        else:
            self._fs, root = sf.fs, sf.path
        self._url = sf.url
        self.files = {os.path.basename(p): p for p in self._fs.find(root)}
        self.variant = self._detect(variant)
        self.users, self.items = self._side_tables()
        self._columns = _output_columns(self.users, self.items)

    @classmethod
    def from_tables(cls, users: pl.DataFrame | None, items: pl.DataFrame | None) -> MovieLens:
        """A parser of u.data lines (user, item, rating, timestamp; tab-separated) that joins
        the given side tables as convert joins u.user and u.item (`ravfm serve` parses request
        rows with it, against the side tables a checkpoint keeps)."""
        self = cls.__new__(cls)
        self.variant, self.files, self._url = "ml-100k", {}, "request"
        self.users, self.items = users, items
        self._columns = _output_columns(users, items)
        return self

    def _detect(self, asked: str) -> str:
        f = self.files
        if "u.data" in f:
            found = "ml-100k"
        elif "ratings.dat" in f:
            found = "ml-1m" if "users.dat" in f else "ml-10m"
        elif "ratings.csv" in f:
            d = os.path.basename(os.path.dirname(f["ratings.csv"])).lower()
            found = next((v for v in ("ml-20m", "ml-25m") if d.startswith(v)), "latest")
        else:
            raise UserError(
                f"{self._url}: no u.data, ratings.dat or ratings.csv inside; point "
                "SRC at a MovieLens directory or .zip"
            )
        if asked not in ("auto", *VARIANTS):
            raise UserError(
                f"--variant {asked!r} is not a MovieLens variant; choose auto or "
                f"{', '.join(VARIANTS)}"
            )
        same_layout = {"ml-20m", "ml-25m", "latest"}
        if asked != "auto" and asked != found and not {asked, found} <= same_layout:
            raise UserError(
                f"{self._url}: holds {found} files, not the --variant {asked} asked "
                "for; fix --variant or SRC"
            )
        return found if asked == "auto" else asked

    def _read(self, name: str) -> bytes:
        if name not in self.files:
            raise UserError(
                f"{self._url}: {name} is missing; the MovieLens directory is incomplete"
            )
        with self._fs.open(self.files[name], "rb") as f:
            return f.read()

    def _latin1(self, name: str) -> bytes:
        return self._read(name).decode("latin-1").replace("::", _SEP).encode("utf-8")

    def _side_tables(self) -> tuple[pl.DataFrame | None, pl.DataFrame]:
        v = self.variant
        if v == "ml-100k":
            users = pl.read_csv(
                self._read("u.user"),
                has_header=False,
                separator="|",
                quote_char=None,
                schema={
                    "user_id": pl.Int64,
                    "age": pl.Int16,
                    "gender": pl.String,
                    "occupation": pl.String,
                    "zip": pl.String,
                },
            )
            names = _GENRES_100K
            if "u.genre" in self.files:
                g = self._read("u.genre").decode("latin-1").split("\n")
                names = tuple(line.split("|")[0] for line in g if "|" in line)
            cols = [
                "item_id",
                "title",
                "release",
                "video",
                "url",
                *[f"g{i}" for i in range(len(names))],
            ]
            items = pl.read_csv(
                self._latin1("u.item"),
                has_header=False,
                separator="|",
                quote_char=None,
                new_columns=cols,
                schema_overrides={"item_id": pl.Int64},
            )
            flags = [
                pl.when(pl.col(f"g{i}").cast(pl.Int8) == 1).then(pl.lit(n))
                for i, n in enumerate(names)
            ]
            items = items.select("item_id", pl.concat_list(flags).list.drop_nulls().alias("genres"))
            return users, items
        if v in ("ml-1m", "ml-10m"):
            users = None
            if v == "ml-1m":
                users = pl.read_csv(
                    self._latin1("users.dat"),
                    has_header=False,
                    separator=_SEP,
                    quote_char=None,
                    schema={
                        "user_id": pl.Int64,
                        "gender": pl.String,
                        "age": pl.Int16,
                        "occupation": pl.String,
                        "zip": pl.String,
                    },
                )
            items = pl.read_csv(
                self._latin1("movies.dat"),
                has_header=False,
                separator=_SEP,
                quote_char=None,
                schema={"item_id": pl.Int64, "title": pl.String, "genres": pl.String},
            )
        else:
            users = None
            items = pl.read_csv(self._read("movies.csv"), infer_schema=False).select(
                pl.col("movieId").cast(pl.Int64).alias("item_id"), "title", "genres"
            )
        items = items.select(
            "item_id",
            pl.col("genres")
            .replace("(no genres listed)", "")
            .str.split("|")
            .list.eval(pl.element().filter(pl.element() != "")),
        )
        return users, items

    def parts(self, split: str) -> Iterator[tuple[str, IO[bytes], str | None]]:
        """(file label, stream, fixed split or None) for each ratings file of SPLIT."""
        if split in STANDARD_SPLITS:
            if self.variant != "ml-100k":
                raise UserError(
                    f"--split {split} is a MovieLens 100K standard split; {self._url} "
                    f"is {self.variant}: use --split hash"
                )
            names = [(f"{split}.base", "train"), (f"{split}.test", "test")]
        else:
            name = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-10m": "ratings.dat"}
            names = [(name.get(self.variant, "ratings.csv"), None)]
        for name, fixed in names:
            if name not in self.files:
                raise UserError(
                    f"{self._url}: {name} is missing; the MovieLens directory is incomplete"
                )
            with self._fs.open(self.files[name], "rb") as f:
                yield f"{self._url}/{name}", _Sep(f) if name.endswith(".dat") else f, fixed

    def fingerprint_files(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(self.files):
            if name.startswith(
                ("u.", "u1", "u2", "u3", "u4", "u5", "ua", "ub", "ratings", "users", "movies")
            ):
                info = self._fs.info(self.files[name])
                stamp = {k: info[k] for k in ("mtime",) if info.get(k) is not None}
                out.append({"url": f"{self._url}/{name}", "size": info.get("size"), **stamp})
        return out

    def start(self, file: str, head: bytes, variant: str) -> tuple[str, int]:
        return self.variant, 1 if file.endswith(".csv") else 0

    def columns(self, variant: str) -> dict[str, str]:
        return dict(self._columns)

    def label(self, variant: str) -> str | None:
        return "rating"

    def parse(self, block: bytes, *, file: str, first_line: int, variant: str) -> Parsed:
        sep = "," if file.endswith(".csv") else (_SEP if file.endswith(".dat") else "\t")
        p = parse_delimited(
            block,
            pl_schema(_RATING),
            sep=sep,
            file=file,
            first_line=first_line,
            reasons={"rating": "bad_label"},
        )
        r = p.df["rating"]
        p = drop_rows(p, ~((r >= 0.5) & (r <= 5.0)).fill_null(False), "bad_label")
        if sep == _SEP:
            p.rejects = [
                Reject(j.file, j.line, j.reason, j.raw.replace(b"\x1f", b"::")) for j in p.rejects
            ]
        df = p.df
        if self.users is not None:
            df = df.join(self.users, on="user_id", how="left", maintain_order="left")
        if self.items is not None:
            df = df.join(self.items, on="item_id", how="left", maintain_order="left")
        p.df = df.select(pl.col(c).cast(t) for c, t in pl_schema(self._columns).items())
        return p


def _output_columns(users: pl.DataFrame | None, items: pl.DataFrame | None) -> dict[str, str]:
    """Shard columns (name -> dtype name) of ratings joined with these side tables."""
    side = set(users.columns if users is not None else ()) | set(
        items.columns if items is not None else ()
    )
    return {c: t for c, t in MOVIELENS.columns.items() if c in _RATING or c in side}


class _Sep(io.RawIOBase):
    """A binary stream that turns `::` into one separator byte (a `::` split across two reads
    is handled by holding back a trailing `:`)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self._held = f, b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._held + self._f.read(n)
        self._held = b""
        if data.endswith(b":") and not data.endswith(b"::"):
            data, self._held = data[:-1], b":"
        return data.replace(b"::", _SEP.encode())
