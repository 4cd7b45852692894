"""FeatureSpec: everything that maps a raw value to a row of the embedding table.

Saved as `feature_spec.json` (plus `kept_rows.npy`), kept in every checkpoint, and checked
before resuming or scoring. A raw value first gets a HASHED row (hashing.py has the exact map):

    row 0                       padding (id 0, value 0.0; contributes nothing)
    rows offset_f .. +buckets_f hashed rows of field f. id_space "shared": every field hashes
                                into rows 1 .. 2^hash_bits with its own seed; "per_field": field f
                                owns its own power-of-two block of 2^hash_bits / 2^ceil(log2 #fields)

`ravfm stats` then keeps the hashed rows seen at least min_count times in train (`kept_rows`,
sorted) and the table is COMPACT, sized by the rows in use rather than by 2^hash_bits:

    row 0                       padding
    rows 1 .. K                 kept_rows[0 .. K-1], in order
    rows K+1 .. K+#fields       one out-of-vocabulary row per field: a hashed row that was not
                                kept (rarer than min_count, or never seen in train) maps to the
                                OOV row of the field it came from

A spec built without kept rows (tests, benchmarks) has no compaction: its table holds every
hashed row, then the OOV rows.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import polars_hash

from ravfm.config import FeatureConfig
from ravfm.data.schemas import MOVIELENS_SIDE, schema_for
from ravfm.errors import UserError
from ravfm.features.hashing import HASH_FUNCTION, INT_HASH, field_seed
from ravfm.storage import Store

__all__ = [
    "FieldSpec",
    "FeatureSpec",
    "build_spec",
    "SPEC_NAME",
    "KEPT_NAME",
    "FORMAT_VERSION",
    "DEFAULT_MULTI_WIDTH",
]

SPEC_NAME = "feature_spec.json"
KEPT_NAME = "kept_rows.npy"
FORMAT_VERSION = 2  # 2: compact tables (rows in use, not 2^hash_bits)
DEFAULT_MULTI_WIDTH = {"genres": 10, "idx": 64}  # until `ravfm stats` measures the train maximum
_VALUE_COLUMNS = {"idx": "val"}  # libsvm: idx:val pairs


@dataclass(frozen=True)
class FieldSpec:
    """One raw column -> `width` id columns. hasher: xxh3_64 (strings) or splitmix64 (integers)."""

    name: str
    kind: str  # categorical | numeric | multi
    dtype: str  # Polars dtype name of the column in the shards
    hasher: str
    seed: int
    offset: int  # first hashed row of this field
    buckets: int  # hashed rows of this field (a power of two)
    oov_row: int
    width: int = 1  # id columns: 1, or the padded width of a multi-valued field
    bucketiser: str | None = None  # numeric: log2 | quantile
    edges: tuple[float, ...] = ()  # quantile edges fitted on train (sorted, unique)
    value_column: str | None = None  # multi: a parallel List(Float32) of values (libsvm "val")


@dataclass(frozen=True)
class FeatureSpec:
    """The hashing contract. Shapes: ids (B, F) with F = num_fields, rows in [0, num_rows)."""

    dataset: str
    label: str | None
    task: str  # binary | regression
    fields: tuple[FieldSpec, ...]
    hash_bits: int
    id_space: str  # shared | per_field
    min_count: int
    hash_function: str = HASH_FUNCTION
    int_hash: str = INT_HASH
    versions: dict = field(default_factory=dict, compare=False)
    format_version: int = FORMAT_VERSION
    kept_rows: np.ndarray | None = field(default=None, compare=False, repr=False)  # sorted int64
    # train labels: {"n", "mean", "min", "max"} (regression: bias start and prediction range)
    label_stats: dict = field(default_factory=dict, compare=False)

    # ---- derived shape facts ------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        """N: table rows (row 0 padding, hashed rows, one OOV row per field)."""
        return max(f.oov_row for f in self.fields) + 1

    @property
    def num_fields(self) -> int:
        """F: width of ids (B, F), the sum of field widths."""
        return sum(f.width for f in self.fields)

    @property
    def columns(self) -> list[str]:
        """The data columns the fields read, in field order: names, then libSVM value columns."""
        return list(dict.fromkeys(c for f in self.fields for c in (f.name, f.value_column) if c))

    @property
    def field_index(self) -> list[int]:
        """(F,) field number of each id column (VFM groups its priors by field)."""
        return [i for i, f in enumerate(self.fields) for _ in range(f.width)]

    @property
    def compact(self) -> bool:
        """True when hashed rows map to a compact table of the kept rows (see the docstring)."""
        return self.kept_rows is not None

    @functools.cached_property
    def remap(self) -> np.ndarray | None:
        """The hashed -> compact row table (ravfm.features.kernels.build_remap), or None."""
        if self.kept_rows is None:
            return None
        from ravfm.features.kernels import build_remap

        return build_remap(self.kept_rows)

    # ---- identity -----------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        """Every key that changes a row id or the task, in comparison order."""
        kept = None
        if self.kept_rows is not None:
            kept = hashlib.sha256(
                np.ascontiguousarray(self.kept_rows, np.int64).tobytes()
            ).hexdigest()
        return {
            "format_version": self.format_version,
            "dataset": self.dataset,
            "task": self.task,
            "hash_function": self.hash_function,
            "int_hash": self.int_hash,
            "hash_bits": self.hash_bits,
            "id_space": self.id_space,
            "min_count": self.min_count,
            "num_rows": self.num_rows,
            "fields": [f.name for f in self.fields],
            **{f"field {f.name}": dataclasses.asdict(f) for f in self.fields},
            "kept_rows": kept,
        }

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self._identity(), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def check_compatible(self, other: FeatureSpec) -> None:
        """Raise UserError naming the first differing key (label name and versions are free)."""
        a, b = self._identity(), other._identity()
        for key in a:
            if a[key] != b.get(key):
                x, y = a[key], b.get(key)
                if isinstance(x, dict) and isinstance(y, dict):
                    sub = next(k for k in x if x[k] != y.get(k))
                    key, x, y = f"{key} {sub}", x[sub], y.get(sub)
                raise UserError(
                    f"feature spec mismatch: {key} {_short(x)} != {_short(y)}; use "
                    "the feature settings of the checkpoint (or retrain from scratch)"
                )

    # ---- disk ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("fields", "kept_rows")
        }
        out["fields"] = [dataclasses.asdict(f) for f in self.fields]
        out["num_rows"], out["num_fields"] = self.num_rows, self.num_fields
        out["kept_rows"] = (
            None
            if self.kept_rows is None
            else {
                "file": KEPT_NAME,
                "count": int(len(self.kept_rows)),
                "sha256": self._identity()["kept_rows"],
            }
        )
        out["fingerprint"] = self.fingerprint
        return out

    def save(self, path: str | Path) -> str:
        """Write DIR/feature_spec.json (or the given .json path) and its kept_rows.npy sidecar;
        DIR may be a local path or a storage URL. Returns the spec file's path or URL."""
        store, name = _spec_location(path)
        store.makedirs()
        if self.kept_rows is not None:
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(self.kept_rows, np.int64), allow_pickle=False)
            store.write_bytes(KEPT_NAME, buf.getvalue())
        store.write_bytes(name, (json.dumps(self.to_json(), indent=1) + "\n").encode())
        return store.url_of(name)

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        """Read a spec written by `save` (a directory holding feature_spec.json, or the file;
        a local path or a storage URL)."""
        store, name = _spec_location(path)
        p = store.url_of(name)
        if not store.exists(name):
            raise UserError(f"{path}: no {SPEC_NAME}; run `ravfm stats SHARDS --out DIR` first")
        try:
            d = json.loads(store.read_bytes(name))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: not valid JSON ({e}); re-run `ravfm stats`") from None
        if d.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{p}: format_version {d.get('format_version')!r} is not supported "
                f"(this ravfm reads {FORMAT_VERSION}); re-run `ravfm stats`"
            )
        kept = None
        if d.get("kept_rows"):
            kname = d["kept_rows"]["file"]
            if not store.exists(kname):
                raise UserError(f"{p}: its sidecar {kname} is missing; re-run `ravfm stats`")
            try:
                kept = np.load(io.BytesIO(store.read_bytes(kname)), allow_pickle=False)
            except ValueError as e:
                raise UserError(
                    f"{p}: its sidecar {kname} is damaged ({e}); re-run `ravfm stats`"
                ) from None
            kept = kept.astype(np.int64, copy=False)
        fields = tuple(FieldSpec(**{**f, "edges": tuple(f.get("edges", ()))}) for f in d["fields"])
        names = {f.name for f in dataclasses.fields(cls)} - {"fields", "kept_rows"}
        spec = cls(fields=fields, kept_rows=kept, **{k: d[k] for k in names if k in d})
        if d.get("fingerprint") != spec.fingerprint:
            raise UserError(
                f"{p}: fingerprint {d.get('fingerprint')} does not match its content "
                f"({spec.fingerprint}); the file or {KEPT_NAME} was edited, re-run "
                "`ravfm stats`"
            )
        return spec


def _spec_location(path: str | Path) -> tuple[Store, str]:
    """(the directory's Store, the spec file's name) for a directory or a .json path."""
    text = str(path)
    if text.endswith(".json"):
        head, _, tail = text.rstrip("/").rpartition("/")
        return Store(head or "."), tail
    return Store(text), SPEC_NAME


def _short(v: Any) -> str:
    s = json.dumps(v, default=list) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


# ---- building a spec from the shards' index -------------------------------------------------


def _kind_of(name: str, dtype: str, default_kind: dict[str, str]) -> str:
    if name in default_kind:
        return default_kind[name]
    if dtype.startswith("List"):
        return "multi"
    return "categorical"


def _hasher(dtype: str, kind: str) -> str:
    inner = dtype[5:-1] if dtype.startswith("List(") else dtype
    if kind == "numeric":
        return INT_HASH
    if inner in ("String", "Utf8"):
        return HASH_FUNCTION
    if inner.startswith(("Int", "UInt")):
        return INT_HASH
    raise UserError(
        f"column {dtype!r} cannot be hashed as {kind}; features take String or "
        "integer columns (numeric fields: integer or float)"
    )


def build_spec(
    index: dict,
    cfg: FeatureConfig,
    *,
    task: str | None = None,
    widths: dict[str, int] | None = None,
    edges: dict[str, tuple] | None = None,
    kept_rows: np.ndarray | None = None,
) -> FeatureSpec:
    """Spec for the shards described by `index` (`ravfm.data.index.read_index`) under `cfg`.

    Fields default to the dataset's feature columns (schemas.py) present in the index's schema;
    cfg.fields overrides. `ravfm stats` passes the measured multi widths, quantile edges and
    the rows kept by min-count folding; without them multi widths take DEFAULT_MULTI_WIDTH.
    """
    dataset = index.get("dataset")
    schema = dict(index.get("schema") or {})
    ds = schema_for(dataset)
    default_kind = {
        **{c: "categorical" for c in ds.categorical},
        **{c: "numeric" for c in ds.numeric},
        **{c: "multi" for c in ds.multi},
    }
    if dataset == "movielens":
        default_kind.update({c: "categorical" for c in MOVIELENS_SIDE}, genres="multi")
        default_fields = [c for c in (*ds.categorical, *MOVIELENS_SIDE) if c in schema]
    else:
        default_fields = [c for c in ds.features if c in schema]
    names = list(cfg.fields) or default_fields
    missing = [n for n in names if n not in schema]
    if missing:
        raise UserError(
            f"features.fields names {missing[0]!r}, which the shards do not have; "
            f"choose from {', '.join(c for c in schema if c != index.get('label'))}"
        )
    if not names:
        raise UserError(
            f"the {dataset} shards have none of the default feature columns; "
            "name them with features.fields=[...]"
        )
    if len(set(names)) != len(names):
        raise UserError(f"features.fields={names} repeats a column; list each one once")
    n, bits = len(names), cfg.hash_bits
    if cfg.id_space == "shared":
        block_bits = bits
    else:
        block_bits = bits - math.ceil(math.log2(n)) if n > 1 else bits
        if block_bits < 1:
            raise UserError(
                f"features.hash_bits={bits} is too small for {n} per-field blocks; "
                f"use at least {bits - block_bits + 1} or features.id_space=shared"
            )
    if kept_rows is not None:  # sorted and unique: kept row j is compact row j + 1
        kept_rows = np.asarray(kept_rows, np.int64)
        if len(kept_rows) > 1 and not (kept_rows[1:] > kept_rows[:-1]).all():
            kept_rows = np.unique(kept_rows)
    hashed_end = 1 + (1 << bits)  # rows [1, hashed_end) are hashed rows in either layout
    out = []
    for i, name in enumerate(names):
        dtype = str(schema[name])
        kind = _kind_of(name, dtype, default_kind)
        bucketiser = cfg.numeric if kind == "numeric" else None
        fe = tuple(float(e) for e in (edges or {}).get(name, ()))
        if bucketiser == "quantile" and not fe:
            raise UserError(
                f"features.numeric=quantile needs edges fitted on train for {name}; "
                "run `ravfm stats SHARDS --out DIR numeric=quantile`"
            )
        width = (
            (widths or {}).get(name, DEFAULT_MULTI_WIDTH.get(name, 16)) if kind == "multi" else 1
        )
        offset = 1 if cfg.id_space == "shared" else 1 + (i << block_bits)
        value_column = _VALUE_COLUMNS.get(name) if kind == "multi" else None
        out.append(
            FieldSpec(
                name=name,
                kind=kind,
                dtype=dtype,
                hasher=_hasher(dtype, kind),
                seed=field_seed(name, cfg.seed),
                offset=offset,
                buckets=1 << block_bits,
                oov_row=(hashed_end if kept_rows is None else 1 + len(kept_rows)) + i,
                width=int(width),
                bucketiser=bucketiser,
                edges=fe,
                value_column=value_column if value_column in schema else None,
            )
        )
    label = index.get("label")
    if task is None:
        task = "regression" if dataset == "movielens" else "binary"
    return FeatureSpec(
        dataset=dataset,
        label=label,
        task=task,
        fields=tuple(out),
        hash_bits=bits,
        id_space=cfg.id_space,
        min_count=cfg.min_count,
        versions={"polars": pl.__version__, "polars_hash": polars_hash.__version__},
        kept_rows=kept_rows,
    )
