"""Ray Data ingest: every row of a split once per epoch, hashed as `transform` hashes it, in a
seeded row-group order that changes between epochs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ravfm.config import FeatureConfig
from ravfm.data.convert import convert
from ravfm.data.index import split_paths
from ravfm.features.stats import run_stats
from ravfm.features.transform import transform
from ravfm.ingest import hashed_dataset, row_groups

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def criteo(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("ingest")
    src = shared_data / "criteo" / "dac_sample_8k.txt"
    convert("criteo", str(src), tmp / "shards", rows_per_shard=1500)
    spec = run_stats(str(tmp / "shards"), str(tmp / "spec"), FeatureConfig(hash_bits=16))
    return split_paths(tmp / "shards", "train"), spec


def _epoch(it) -> dict[str, np.ndarray]:
    parts = list(it.iter_batches(batch_size=500, batch_format="numpy"))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_each_epoch_streams_every_row_once_hashed_like_transform(ray_local, criteo):
    paths, spec = criteo
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    want = transform(table, spec)
    rows = table.column("_row").to_numpy()
    assert len(row_groups(paths)) > 1  # several blocks, so order can change
    it = hashed_dataset(paths, spec, shuffle_seed=3, batch_rows=700).streaming_split(1)[0]
    orders = []
    for _ in range(2):
        got = _epoch(it)
        assert len(got["row"]) == len(rows) and set(got["row"]) == set(rows)
        order = np.argsort(got["row"])
        at = np.argsort(rows)
        np.testing.assert_array_equal(got["ids"][order], want["ids"][at])
        np.testing.assert_array_equal(got["values"][order], want["values"][at])
        np.testing.assert_array_equal(got["label"][order], want["label"][at])
        orders.append(got["row"])
    assert not np.array_equal(orders[0], orders[1])  # reshuffled per epoch, still exact
