"""The Parquet column contract of each dataset: what `convert` writes and `features` reads.

Columns are named and typed explicitly, never inferred. Dtype names are Polars names so the
contract can be stored in `_index.json` as plain strings.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DatasetSchema",
    "SCHEMAS",
    "CRITEO_INT",
    "CRITEO_CAT",
    "CRITEO_HEX_DIGITS",
    "SCHEMA_REVISION",
    "AVAZU_CAT",
    "ROW_COLUMN",
    "schema_for",
]

# Every shard also carries the source row number (0-based over the whole source, Int64):
# unique per row, so a restarted training run can skip exactly the rows it already trained.
ROW_COLUMN = "_row"

CRITEO_INT = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CAT = tuple(f"C{i}" for i in range(1, 27))
# Criteo's categorical values are 32-bit hashes written as 8 hex digits: shards keep them as
# UInt32 (lossless: f"{v:08x}" gives the text back). Four bytes instead of a string make the
# shards ~10x faster to read and let features hash them with the integer mixer.
CRITEO_HEX_DIGITS = 8
# Bumped whenever a dataset's columns change (2: Criteo C1..C26 String -> UInt32); `convert`
# records it with its options, so shards written under an older contract are re-converted.
SCHEMA_REVISION = 2
AVAZU_CAT = (
    "C1",
    "banner_pos",
    "site_id",
    "site_domain",
    "site_category",
    "app_id",
    "app_domain",
    "app_category",
    "device_id",
    "device_ip",
    "device_model",
    "device_type",
    "device_conn_type",
    "C14",
    "C15",
    "C16",
    "C17",
    "C18",
    "C19",
    "C20",
    "C21",
)


@dataclass(frozen=True)
class DatasetSchema:
    """Columns of one dataset's shards.

    columns: name -> Polars dtype name ("Int8", "Int64", "Float32", "String", "List(String)",
    "List(Int64)", "List(Float32)", "List(Int32)"). `label` is the target column (None when the
    source has none, e.g. Criteo test.txt). `categorical`, `numeric` and `multi` are the default
    feature columns by kind; `passthrough` are id columns that scoring may keep.
    """

    name: str
    columns: dict[str, str]
    label: str | None
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    multi: tuple[str, ...] = ()
    passthrough: tuple[str, ...] = ()

    @property
    def features(self) -> tuple[str, ...]:
        return self.categorical + self.numeric + self.multi


CRITEO = DatasetSchema(
    name="criteo",
    columns={
        "label": "Int8",
        **{c: "Int64" for c in CRITEO_INT},
        **{c: "UInt32" for c in CRITEO_CAT},
    },
    label="label",
    categorical=CRITEO_CAT,
    numeric=CRITEO_INT,
)

AVAZU = DatasetSchema(
    name="avazu",
    columns={
        "id": "String",
        "click": "Int8",
        "hour": "Int64",
        "hour_of_day": "Int8",
        "weekday": "Int8",
        **{c: "String" for c in AVAZU_CAT},
    },
    label="click",
    categorical=("hour_of_day", "weekday") + AVAZU_CAT,
    passthrough=("id",),
)

# ml-100k and ml-1m carry user side features; ml-10m/20m/25m/latest carry genres only, so their
# shards simply lack age/gender/occupation/zip (features built from the index's actual schema).
MOVIELENS = DatasetSchema(
    name="movielens",
    columns={
        "user_id": "Int64",
        "item_id": "Int64",
        "rating": "Float32",
        "timestamp": "Int64",
        "age": "Int16",
        "gender": "String",
        "occupation": "String",
        "zip": "String",
        "genres": "List(String)",
    },
    label="rating",
    categorical=("user_id", "item_id"),
    passthrough=("user_id", "item_id", "timestamp"),
)
MOVIELENS_SIDE = ("age", "gender", "occupation", "genres")  # the side-feature variant's extras

# libSVM / libFM: `label idx:val ...`; libFFM adds a field per pair (`field:idx:val`).
LIBSVM = DatasetSchema(
    name="libsvm",
    columns={
        "label": "Float32",
        "idx": "List(Int64)",
        "val": "List(Float32)",
        "field": "List(Int32)",
    },
    label="label",
    multi=("idx",),
)

SCHEMAS = {s.name: s for s in (CRITEO, AVAZU, MOVIELENS, LIBSVM)}


def schema_for(dataset: str) -> DatasetSchema:
    if dataset not in SCHEMAS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(SCHEMAS)}")
    return SCHEMAS[dataset]
