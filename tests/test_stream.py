"""How a split's rows reach a rank: every row group to exactly one rank, every row once per epoch
in fixed-size batches, a seeded order that changes per epoch, and skipped rows left out."""

from __future__ import annotations

import numpy as np
import pytest

from ravfm.features.stream import RowGroup, rank_groups, rebatch


def _groups(sizes):
    return [RowGroup(f"f{i // 3}.parquet", i % 3, n) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_every_row_group_goes_to_exactly_one_rank(size):
    groups = _groups([7, 1, 13, 4, 9, 2, 11])
    for epoch in range(3):
        dealt = [rank_groups(groups, r, size, seed=5, epoch=epoch) for r in range(size)]
        flat = [g for part in dealt for g in part]
        assert sorted(flat, key=lambda g: (g.path, g.group)) == groups
        assert max(map(len, dealt)) - min(map(len, dealt)) <= 1


def test_the_seeded_order_changes_per_epoch_and_evaluation_keeps_file_order():
    groups = _groups(range(1, 20))
    orders = [rank_groups(groups, 0, 1, seed=1, epoch=e) for e in range(3)]
    assert orders[0] != orders[1] != orders[2]
    assert rank_groups(groups, 0, 1, seed=1, epoch=1) == orders[1]  # reproducible
    assert rank_groups(groups, 0, 1) == groups


def _blocks(sizes, start=0):
    out, row = [], start
    for n in sizes:
        r = np.arange(row, row + n)
        out.append({"ids": np.stack([r, r + 1], 1), "label": (r % 2).astype(np.float32), "row": r})
        row += n
    return out


@pytest.mark.parametrize("shuffle", [0, 25])
def test_rebatch_yields_every_row_once_in_full_batches(shuffle):
    sizes = [10, 3, 17, 1, 30]
    batches = list(rebatch(_blocks(sizes), 8, shuffle_rows=shuffle, seed=[3, 0]))
    rows = np.concatenate([b["row"] for b in batches])
    assert sorted(rows.tolist()) == list(range(sum(sizes)))
    assert all(len(b["row"]) == 8 for b in batches[:-1]) and 0 < len(batches[-1]["row"]) <= 8
    for b in batches:  # columns stay aligned
        np.testing.assert_array_equal(b["ids"][:, 0], b["row"])
    if shuffle:
        assert rows.tolist() != sorted(rows.tolist())
        again = np.concatenate(
            [b["row"] for b in rebatch(_blocks(sizes), 8, shuffle_rows=25, seed=[3, 0])]
        )
        np.testing.assert_array_equal(rows, again)  # the same seed, the same batches
    else:
        assert rows.tolist() == list(range(sum(sizes)))


def test_rebatch_depends_on_the_rows_not_on_how_they_are_blocked():
    a = [b["row"] for b in rebatch(_blocks([40, 20]), 7, shuffle_rows=30, seed=9)]
    b = [b["row"] for b in rebatch(_blocks([15, 25, 1, 19]), 7, shuffle_rows=30, seed=9)]
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_rebatch_drops_skipped_rows():
    skip = np.array([0, 5, 6, 29, 1000])
    rows = np.concatenate([b["row"] for b in rebatch(_blocks([10, 20]), 4, skip=skip)])
    assert sorted(rows.tolist()) == sorted(set(range(30)) - set(skip.tolist()))
