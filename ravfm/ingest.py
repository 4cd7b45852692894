"""Ray Data ingest: Parquet shards -> feature hashing in map_batches -> numpy batches.

Used by the driver (training and evaluation) and by batch scoring, so both hash the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray.data

from ravfm.data.schemas import ROW_COLUMN
from ravfm.features.spec import FeatureSpec
from ravfm.features.transform import transform

__all__ = ["ROW_COLUMN", "hashed_dataset", "hash_batch", "quiet_data_context"]


def hash_batch(
    table: pa.Table, spec: FeatureSpec, keep: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """One Arrow batch -> {"ids" (B,F), "values" (B,F), "label" (B,), ["row" (B,)], kept columns}."""
    out = transform(table, spec)
    if ROW_COLUMN in table.column_names:
        out["row"] = table.column(ROW_COLUMN).to_numpy(zero_copy_only=False).astype(np.int64)
    for col in keep:
        out[col] = table.column(col).to_numpy(zero_copy_only=False)
    return out


def quiet_data_context() -> None:
    """No per-dataset progress bars or execution banners: the driver prints its own line."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    for attr in ("print_on_execution_start", "enable_operator_progress_bars"):
        if hasattr(ctx, attr):
            setattr(ctx, attr, False)


def hashed_dataset(
    paths: list[str],
    spec: FeatureSpec,
    *,
    shuffle_seed: int | None = None,
    keep: tuple[str, ...] = (),
    batch_rows: int = 65536,
    filesystem: Any = None,
) -> ray.data.Dataset:
    """A lazily hashed dataset over Parquet `paths`; file order shuffled per epoch if seeded."""
    from ray.data import FileShuffleConfig

    shuffle = FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    ds = ray.data.read_parquet(paths, shuffle=shuffle, filesystem=filesystem)
    return ds.map_batches(
        hash_batch,
        batch_format="pyarrow",
        batch_size=batch_rows,
        fn_kwargs={"spec": spec, "keep": tuple(keep)},
        zero_copy_batch=True,
    )
