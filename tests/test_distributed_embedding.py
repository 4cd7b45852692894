"""SparseTable and RowShardedTable in one process: lookups, sparse gradients, rows by global id."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from ravfm.distributed.embedding import RowShardedTable, SparseTable, table_factory
from ravfm.distributed.world import World
from ravfm.model.fm import fm_init
from ravfm.model.layers import PlainTable

N, D = 50, 5
INIT = partial(fm_init, std=0.1)


def _pair(dtype=torch.float64):
    torch.manual_seed(0)
    plain = PlainTable("t", N, D, INIT, dtype=dtype)
    torch.manual_seed(0)
    sparse = SparseTable("t", N, D, INIT, dtype=dtype)
    return plain, sparse


def test_sparse_table_starts_as_the_plain_table_and_gathers_the_same_rows():
    plain, sparse = _pair()
    assert torch.equal(plain.weight.detach(), sparse.weight)
    ids = torch.randint(0, N, (7, 3))
    assert torch.equal(sparse(ids), plain(ids))
    with torch.no_grad():
        assert torch.equal(sparse(ids), plain(ids))


def test_sparse_gradient_equals_the_dense_gradient_on_touched_rows_only():
    plain, sparse = _pair()
    ids = torch.tensor([[3, 7, 3], [7, 7, 11]])
    w = torch.randn(2, 3, D, dtype=torch.float64)
    (plain(ids) * w).sum().backward()
    (sparse(ids) * w).sum().backward()
    g = sparse.sparse_grad()
    assert g.rows.tolist() == [3, 7, 11]  # duplicates coalesced, ascending
    torch.testing.assert_close(g.grad, plain.weight.grad[g.rows], rtol=0, atol=1e-14)
    assert torch.equal(g.packed, sparse.storage[g.rows])
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[g.rows] = False
    assert plain.weight.grad[untouched].abs().sum() == 0
    assert not sparse.weight.requires_grad and sparse.weight.grad is None
    assert list(sparse.parameters()) == []  # nothing for DDP or a dense optimizer


def test_two_lookups_before_a_step_add_their_gradients():
    plain, sparse = _pair()
    a, b = torch.tensor([1, 2, 2]), torch.tensor([2, 4])
    (plain(a).sum() + 3 * plain(b).sum()).backward()
    (sparse(a).sum() + 3 * sparse(b).sum()).backward()
    g = sparse.sparse_grad()
    assert g.rows.tolist() == [1, 2, 4] and g.packed is None
    torch.testing.assert_close(g.grad, plain.weight.grad[g.rows], rtol=0, atol=1e-14)
    sparse.zero_grad()
    assert sparse.sparse_grad() is None


def test_a_forward_without_backward_leaves_no_gradient_behind():
    _, sparse = _pair()
    sparse(torch.tensor([1, 2]))
    assert sparse.sparse_grad() is None


def test_ids_out_of_range_raise():
    _, sparse = _pair()
    with pytest.raises(IndexError):
        sparse(torch.tensor([N]))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_row_sharded_init_holds_rows_r_mod_w_of_the_same_table(size):
    torch.manual_seed(0)
    full = PlainTable("t", 70_000, 3, INIT, dtype=torch.float32).weight.detach()  # > one init chunk
    for rank in range(size):
        torch.manual_seed(0)
        t = RowShardedTable("t", 70_000, 3, INIT, World(rank, size))
        ids, rows = t.export_rows()
        assert torch.equal(ids, torch.arange(rank, 70_000, size))
        assert torch.equal(rows, full[ids])


def test_rows_move_between_world_sizes_by_global_id():
    torch.manual_seed(1)
    src = [RowShardedTable("t", N, D, INIT, World(r, 2), torch.float64) for r in range(2)]
    with torch.no_grad():
        for t in src:
            t.weight.normal_()
    exported = [t.export_rows() for t in src]
    dst = [RowShardedTable("t", N, D, INIT, World(r, 3), torch.float64) for r in range(3)]
    single = SparseTable("t", N, D, INIT, torch.float64)
    for ids, rows in exported:  # every rank reads every file and keeps what it owns
        for t in [*dst, single]:
            t.import_rows(ids, rows)
    everything = torch.empty(N, D, dtype=torch.float64)
    for ids, rows in exported:
        everything[ids] = rows
    assert torch.equal(single.weight, everything)
    for t in dst:
        ids, rows = t.export_rows()
        assert torch.equal(rows, everything[ids])


def test_replicated_table_exports_each_row_from_exactly_one_rank():
    ids = [SparseTable("t", N, D, INIT, world=World(r, 3)).export_rows()[0] for r in range(3)]
    assert sorted(torch.cat(ids).tolist()) == list(range(N))


def test_table_factory_makes_each_kind():
    w = World.single()
    for kind, cls in [("plain", PlainTable), ("sparse", SparseTable), ("rows", RowShardedTable)]:
        t = table_factory(kind, w, torch.float64)("fm", N, D, INIT)
        assert isinstance(t, cls) and t.num_rows == N and t.dim == D
        assert t(torch.tensor([[1, 2]])).shape == (1, 2, D)
        assert t(torch.tensor([[1, 2]])).dtype == torch.float64
    with pytest.raises(ValueError):
        table_factory("dense", w)


@pytest.mark.parametrize("kind", ["sparse", "rows"])
def test_table_bag_gives_the_fm_sums_and_the_same_sparse_gradient(kind):
    torch.manual_seed(0)
    ref = SparseTable("t", N, D, INIT, torch.float64)
    torch.manual_seed(0)
    t = table_factory(kind, World.single(), torch.float64)("t", N, D, INIT)
    ids = torch.tensor([[3, 7, 3], [7, 0, 11]])
    x = torch.tensor([[0.5, 2.0, 1.0], [1.5, 0.0, -1.0]], dtype=torch.float64)
    rows = ref(ids) * x.unsqueeze(-1)  # (B, F, D) the slow way
    sums, nsq = t.bag(ids, x, norms=((1, D),))
    torch.testing.assert_close(sums, rows.sum(1), rtol=0, atol=1e-14)
    torch.testing.assert_close(nsq[:, 0], (rows[..., 1:] ** 2).sum((1, 2)), rtol=0, atol=1e-14)
    ((rows.sum(1) ** 2).sum() + (rows[..., 1:] ** 2).sum()).backward()
    ((sums**2).sum() + nsq.sum()).backward()
    g, rg = t.sparse_grad(), ref.sparse_grad()
    assert torch.equal(g.rows, rg.rows)
    torch.testing.assert_close(g.grad, rg.grad, rtol=0, atol=1e-13)
    with torch.no_grad():
        torch.testing.assert_close(t.bag(ids, x), sums.detach(), rtol=0, atol=0)


def test_an_empty_batch_looks_up_and_steps_nothing():
    _, sparse = _pair()
    ids, x = torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, 4, dtype=torch.float64)
    out = sparse(ids)
    sums, nsq = sparse.bag(ids, x, norms=((1, D),))
    assert out.shape == (0, 4, D) and sums.shape == (0, D) and nsq.shape == (0, 1)
    (torch.nan_to_num(out.mean()) * 0.0 + sums.sum() + nsq.sum()).backward()
    g = sparse.sparse_grad()
    assert g.rows.numel() == 0 and g.grad.shape == (0, D)


def test_skip_init_makes_zero_tables_only_inside_the_block():
    from ravfm.distributed.rows import skip_init

    with skip_init():
        quiet = SparseTable("t", N, D, INIT, dtype=torch.float64)
    drawn = SparseTable("t", N, D, INIT, dtype=torch.float64)
    assert torch.equal(quiet.weight, torch.zeros(N, D, dtype=torch.float64))
    assert drawn.weight.abs().sum() > 0  # the init draws again after the block
