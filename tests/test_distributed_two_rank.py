"""Two gloo ranks on 127.0.0.1 against one process in float64: row-sharded and replicated tables
give the same outputs, gradients and parameters as the single-process SparseTable run.

Each rank trains on its half of every batch (mean loss over its half); the reference trains on
the whole batch. Gradients are averaged over ranks, so the two must agree to rounding."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

from ravfm.batch import Batch
from ravfm.distributed.dense import all_reduce_dense_grads
from ravfm.distributed.embedding import table_factory
from ravfm.distributed.optim import SparseAdagrad, SparseAdam
from ravfm.distributed.world import World, free_port
from ravfm.model.fm import FM

N, K, B, F, STEPS, TOL = 61, 3, 16, 4, 4, 1e-10


def _batches() -> list[Batch]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(1, 20, (B, F), generator=g)  # few ids: duplicates across ranks
        ids[::5, -1] = 0  # padding
        values = torch.rand(B, F, generator=g, dtype=torch.float64)
        values[::5, -1] = 0.0
        out.append(Batch(ids, values, (torch.rand(B, generator=g) < 0.5).double()))
    return out


def _model(kind: str, world: World) -> FM:
    torch.manual_seed(0)
    make = table_factory(kind, world, torch.float64)
    return FM(N, K, make_table=make, init_std=0.3, l2_linear=0.01, l2_factors=0.02).double()


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert a.shape == b.shape and err <= TOL, (
        f"{what}: max error {err:g}, shapes {a.shape} {b.shape}"
    )


def _check_collectives(world: World) -> None:
    t = torch.tensor([float(world.rank + 1)])
    assert world.all_reduce_(t.clone(), op="min").item() == 1.0
    assert world.all_reduce_(t.clone()).item() == 3.0
    parts = world.all_gather_v(torch.arange(world.rank + 1))  # sizes 1 and 2
    assert parts.tolist() == [0, 0, 1]
    send = [1 + world.rank, 2 + world.rank]  # rank 0 sends 1 row to itself, 2 to rank 1, ...
    recv = world.exchange_counts(torch.tensor(send)).tolist()
    assert recv == [[1, 2], [2, 3]][world.rank]
    got = world.exchange(torch.arange(sum(send)) + 10 * world.rank, send, recv)
    assert got.tolist() == [[0, 10, 11], [1, 2, 12, 13, 14]][world.rank]
    p = torch.nn.Linear(1, 1)
    if world.rank == 0:  # one rank without a gradient still joins and gets the average
        p.weight.grad = torch.full((1, 1), 4.0)
    all_reduce_dense_grads(p, world)
    assert p.weight.grad.item() == 2.0 and p.bias.grad is None


def _sparse_opt(model: FM, name: str):
    if name == "adagrad":
        return SparseAdagrad({"table": model.table}, lr=0.1, initial_accumulator=0.1)
    return SparseAdam({"table": model.table}, lr=0.1, betas=(0.8, 0.9))


def _sgd_bias(model: FM) -> None:
    # by hand: a torch.optim here would import torch._dynamo in both ranks (seconds)
    with torch.no_grad():
        model.bias -= 0.05 * model.bias.grad
    model.bias.grad = None


def _train_and_compare(world: World, kind: str, sparse: str) -> None:
    ref, model = _model("sparse", World.single()), _model(kind, world)
    ref_sparse, sparse_opt = _sparse_opt(ref, sparse), _sparse_opt(model, sparse)
    ids0, rows0 = model.table.export_rows()
    _close(rows0, ref.table.weight[ids0], "initial rows")
    lo, hi = world.rank * B // 2, (world.rank + 1) * B // 2
    _check_bag(world, model, ref, _batches()[-1], lo, hi)
    for step, batch in enumerate(_batches()):
        ref_loss, ref_raw = ref.loss(batch, "binary")
        ref_loss.backward()
        loss, raw = model.loss(batch.slice(lo, hi), "binary")
        loss.backward()
        all_reduce_dense_grads(model, world)
        _close(raw, ref_raw[lo:hi], f"{kind}/{sparse} step {step} outputs")
        _close(model.bias.grad, ref.bias.grad, f"{kind}/{sparse} step {step} bias grad")
        g, rg = model.table.sparse_grad(), ref.table.sparse_grad()
        mine = model.table.global_ids(g.rows)
        _, owned = model.table.local_index(rg.rows)
        assert sorted(model.table.global_ids(owned).tolist()) == mine.tolist()
        _close(g.grad, rg.grad[torch.searchsorted(rg.rows, mine)], f"{kind} step {step} grads")
        sparse_opt.step()
        ref_sparse.step()
        _sgd_bias(model)
        _sgd_bias(ref)
    _empty_rank_step(world, model, ref, sparse_opt, ref_sparse, kind)
    ids, rows = model.table.export_rows()
    _close(rows, ref.table.weight[ids], f"{kind}/{sparse} rows after {STEPS + 1} steps")
    _close(model.bias.detach(), ref.bias.detach(), f"{kind}/{sparse} bias")
    state, ref_state = sparse_opt.export_state(), ref_sparse.export_state()
    for key, s in state.items():
        if not key.endswith("/ids"):
            _close(s.double(), ref_state[key][state["table/ids"]].double(), f"{key} state")
    b = _batches()[0]
    _close(
        model.predict(b.ids[lo:hi], b.values[lo:hi]),
        ref.predict(b.ids, b.values)[lo:hi],
        f"{kind} predict without gradients",
    )


def _empty_rank_step(world, model, ref, sparse_opt, ref_sparse, kind: str) -> None:
    """Rank 1 has run out of data and steps on an empty batch (as ravfm.train.loop does): the
    update is the reference's on rank 0's half with its loss halved (gradients average over W)."""
    half = _batches()[0].slice(0, B // 2)
    mine = half if world.rank == 0 else half.slice(0, 0)
    loss, raw = model.loss(mine, "binary")
    if len(mine) == 0:
        loss = torch.nan_to_num(loss) * 0.0
    loss.backward()
    all_reduce_dense_grads(model, world)
    ref_loss, ref_raw = ref.loss(half, "binary")
    (0.5 * ref_loss).backward()
    if world.rank == 0:
        _close(raw, ref_raw, f"{kind} outputs beside an empty rank")
    _close(model.bias.grad, ref.bias.grad, f"{kind} bias grad beside an empty rank")
    for m, opt in ((model, sparse_opt), (ref, ref_sparse)):
        opt.step()
        _sgd_bias(m)


def _check_bag(world: World, model: FM, ref: FM, batch: Batch, lo: int, hi: int) -> None:
    """table.bag on half a batch per rank equals the reference's on the whole batch."""
    norms = ((0, 1), (1, K + 1))
    sums, sq = model.table.bag(batch.ids[lo:hi], batch.values[lo:hi], norms=norms)
    ref_sums, ref_sq = ref.table.bag(batch.ids, batch.values, norms=norms)
    _close(sums, ref_sums[lo:hi], "bag sums")
    _close(sq, ref_sq[lo:hi], "bag norms")
    ((sums**2).sum() + sq.sum()).div(hi - lo).backward()  # mean over this rank's examples
    ((ref_sums**2).sum() + ref_sq.sum()).div(B).backward()
    g, rg = model.table.sparse_grad(), ref.table.sparse_grad()
    mine = model.table.global_ids(g.rows)
    _close(g.grad, rg.grad[torch.searchsorted(rg.rows, mine)], "bag grads")
    model.table.zero_grad()
    ref.table.zero_grad()


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    world = World.init(rank, 2, f"tcp://127.0.0.1:{port}")
    _check_collectives(world)
    for kind, sparse in [("rows", "adagrad"), ("rows", "adam"), ("sparse", "adam")]:
        _train_and_compare(world, kind, sparse)
    world.barrier()
    torch.distributed.destroy_process_group()


def _spawn(fn, nprocs: int = 2, timeout: float = 120.0) -> None:
    ctx = mp.spawn(fn, args=(free_port(),), nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks still running after {timeout:.0f} s (a collective hung)")


def test_two_ranks_equal_one_process_in_float64():
    _spawn(_worker)
