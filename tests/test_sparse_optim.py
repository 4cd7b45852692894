"""Sparse optimizers against slow twins: torch.optim applied row by row to the touched rows."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ravfm.config import OptimConfig
from ravfm.distributed.dense import DenseOptimizer
from ravfm.distributed.embedding import RowShardedTable, SparseTable
from ravfm.distributed.optim import SparseAdagrad, SparseAdam, SparseSGD, build_optimizers
from ravfm.distributed.world import World
from ravfm.errors import UserError
from ravfm.model.fm import FM, fm_init
from ravfm.model.layers import PlainTable

N, D, STEPS = 40, 4, 6
INIT = partial(fm_init, std=0.1)


def _batches():
    g = torch.Generator().manual_seed(3)
    # few distinct ids so that rows repeat within a batch and skip some steps
    return [
        (
            torch.randint(0, 12, (9,), generator=g),
            torch.randn(9, D, generator=g, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def _slow_twin(make_opt):
    """Dense grads from a PlainTable; each touched row is its own Parameter with its own
    torch.optim instance, stepped only on the steps that touch it."""
    torch.manual_seed(0)
    table = PlainTable("t", N, D, INIT, dtype=torch.float64)
    rows = [nn.Parameter(table.weight.detach()[r].clone()) for r in range(N)]
    opts = [make_opt([p]) for p in rows]
    for ids, w in _batches():
        table.weight.grad = None
        with torch.no_grad():
            table.weight.copy_(torch.stack([p.detach() for p in rows]))
        (table(ids) * w).sum().backward()
        for r in sorted(set(ids.tolist())):
            rows[r].grad = table.weight.grad[r].clone()
            opts[r].step()
    return torch.stack([p.detach() for p in rows])


def _fast(make_opt):
    torch.manual_seed(0)
    table = SparseTable("t", N, D, INIT, torch.float64)
    opt = make_opt([table])
    before = table.weight.clone()
    touched = set()
    for ids, w in _batches():
        (table(ids) * w).sum().backward()
        opt.step()
        touched |= set(ids.tolist())
    return table.weight, before, touched


CASES = {
    "sgd": (lambda t: SparseSGD(t, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "adagrad": (
        lambda t: SparseAdagrad(t, lr=0.1, eps=1e-10, initial_accumulator=0.1),
        lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-10, initial_accumulator_value=0.1),
    ),
    "adam": (
        lambda t: SparseAdam(t, lr=0.05, betas=(0.8, 0.9), eps=1e-8),
        lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.9), eps=1e-8),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_optimizer_matches_torch_optim_on_each_touched_row(name):
    fast, slow = CASES[name]
    weight, before, touched = _fast(fast)
    expected = _slow_twin(slow)
    torch.testing.assert_close(weight, expected, rtol=0, atol=1e-12)
    untouched = [r for r in range(N) if r not in touched]
    assert untouched and torch.equal(weight[untouched], before[untouched])  # bit for bit


def test_rowwise_adagrad_keeps_one_accumulator_per_row():
    torch.manual_seed(0)
    table = SparseTable("t", N, D, INIT, torch.float64)
    opt = SparseAdagrad([table], lr=0.1, eps=1e-10, rowwise=True)
    w = table.weight.clone()
    acc = torch.zeros(N, dtype=torch.float64)
    for ids, gw in _batches():
        (table(ids) * gw).sum().backward()
        opt.step()
        for r in sorted(set(ids.tolist())):  # the definition, row by row
            g = gw[ids == r].sum(0)
            acc[r] += (g * g).mean()
            w[r] -= 0.1 * g / (acc[r].sqrt() + 1e-10)
    torch.testing.assert_close(table.weight, w, rtol=0, atol=1e-12)
    assert opt.state["t"]["sum"].shape == (N,)


def test_sparse_optimizer_steps_plain_tables_on_rows_with_a_gradient():
    fast, slow = CASES["adagrad"]
    torch.manual_seed(0)
    table = PlainTable("t", N, D, INIT, dtype=torch.float64)
    opt = fast([table])
    for ids, w in _batches():
        (table(ids) * w).sum().backward()
        opt.step()
        assert table.weight.grad is None
    torch.testing.assert_close(table.weight.detach(), _slow_twin(slow), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_state_export_import_resumes_on_another_world_size(name):
    fast = CASES[name][0]
    batches = _batches()
    torch.manual_seed(0)
    ref = SparseTable("t", N, D, INIT, torch.float64)
    ref_opt = fast({"t": ref})
    for ids, w in batches:
        (ref(ids) * w).sum().backward()
        ref_opt.step()
    # the first half on one process, then resume as three "ranks" (export/import only)
    torch.manual_seed(0)
    first = SparseTable("t", N, D, INIT, torch.float64)
    first_opt = fast({"t": first})
    for ids, w in batches[:3]:
        (first(ids) * w).sum().backward()
        first_opt.step()
    rows, state = first.export_rows(), first_opt.export_state()
    assert set(state) >= {"t/ids"} and state["t/ids"].shape == (N,)
    for rank in range(3):
        t = RowShardedTable("t", N, D, INIT, World(rank, 3), torch.float64)
        opt = fast({"t": t})
        t.import_rows(*rows)
        opt.import_state(state)
        # each shard continues on the ids it owns (what the routed gradient would bring it)
        for ids, w in batches[3:]:
            mine = ids % 3 == rank
            (t._lookup(ids[mine] // 3) * w[mine]).sum().backward()
            opt.step()
        ids_out, w_out = t.export_rows()
        torch.testing.assert_close(w_out, ref.weight[ids_out], rtol=0, atol=1e-12)
        back = opt.export_state()
        for key, s in ref_opt.export_state().items():
            if key != "t/ids":
                torch.testing.assert_close(back[key], s[back["t/ids"]], rtol=0, atol=1e-12)


def test_build_optimizers_splits_tables_from_dense_parameters():
    model = FM(N, 3, make_table=lambda *a: SparseTable(*a, dtype=torch.float64))
    sparse, dense = build_optimizers(model, OptimConfig(sparse="adam", dense="sgd", lr=0.2))
    assert isinstance(sparse, SparseAdam) and list(sparse.tables) == ["table"]
    assert sparse.lr == 0.2
    assert isinstance(dense, DenseOptimizer) and dense.kind == "sgd"
    assert [p for g in dense.param_groups for p in g["params"]] == [model.bias]
    plain = FM(N, 3)
    sparse, dense = build_optimizers(plain, OptimConfig(sparse="sgd"))
    assert isinstance(sparse, SparseSGD) and [
        p for g in dense.param_groups for p in g["params"]
    ] == [plain.bias]
    rowwise = SimpleNamespace(**{**vars(OptimConfig()), "rowwise": True})  # a config with it
    assert build_optimizers(FM(N, 3, make_table=SparseTable), rowwise)[0].rowwise
    only_table = SparseTable("t", N, D, INIT)
    assert build_optimizers(only_table, OptimConfig())[1] is None


def test_importing_another_optimizers_state_is_a_user_error():
    table = SparseTable("t", N, D, INIT, torch.float64)
    state = SparseAdagrad([table]).export_state()
    with pytest.raises(UserError, match="exp_avg"):
        SparseAdam([SparseTable("t", N, D, INIT, torch.float64)]).import_state(state)


@pytest.mark.parametrize("kind", ["adam", "adagrad", "sgd"])
def test_dense_optimizer_equals_torch_optim(kind):
    """DenseOptimizer (no torch.optim, whose first use imports torch._dynamo) against the
    torch.optim rule it follows, over steps with a changing lr and a parameter without grad."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(()))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = DenseOptimizer(a, kind, lr=0.1, betas=(0.8, 0.99), eps=1e-6, initial_accumulator=0.1)
    theirs = {
        "adam": lambda: torch.optim.Adam(b, lr=0.1, betas=(0.8, 0.99), eps=1e-6),
        "adagrad": lambda: torch.optim.Adagrad(b, lr=0.1, eps=1e-6, initial_accumulator_value=0.1),
        "sgd": lambda: torch.optim.SGD(b, lr=0.1),
    }[kind]()
    for step in range(6):
        g = [torch.randn(3, 4), torch.randn(())]
        for p, q, x in zip(a, b, g):
            p.grad = x.clone() if step != 2 or p.ndim else None  # the scalar skips a step
            q.grad = p.grad.clone() if p.grad is not None else None
        ours.param_groups[0]["lr"] = 0.1 / (step + 1)
        for group in theirs.param_groups:
            group["lr"] = 0.1 / (step + 1)
        ours.step()
        theirs.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    again = DenseOptimizer(a, kind, lr=0.1, betas=(0.8, 0.99), eps=1e-6)
    again.load_state_dict(ours.state_dict())
    assert again.state_dict().keys() == ours.state_dict().keys()
