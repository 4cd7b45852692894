"""RaFM against the brute-force min-rank pair loop; one level is FM; distillation's reach."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ravfm.batch import Batch
from ravfm.errors import UserError
from ravfm.model.fm import FM
from ravfm.model.layers import plain_tables
from ravfm.model.rafm import RaFM, rafm_levels

N = 30
RANKS = (2, 3, 5)


def _levels(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lv = torch.randint(0, len(RANKS), (N,), generator=g)
    lv[0] = 0
    lv[1:4] = torch.tensor([0, 1, 2])  # every level occupied
    return lv


def _rafm(ranks=RANKS, levels=None, seed: int = 0, **kw) -> RaFM:
    torch.manual_seed(seed)
    levels = _levels(seed) if levels is None else levels
    model = RaFM(N, ranks, levels, make_table=plain_tables(torch.float64), init_std=0.4, **kw)
    model = model.double()
    with torch.no_grad():
        model.tables[0].weight[:, 0].normal_(0, 0.5)
        model.bias.fill_(-0.2)
    return model


def _batch(b: int = 8, f: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(N - 1, generator=g)[:f] + 1 for _ in range(b)])
    values = torch.rand(b, f, generator=g, dtype=torch.float64) + 0.5
    label = (torch.rand(b, generator=g) > 0.5).double()
    return Batch(ids, values, label)


def _vec(model: RaFM, i: int, level: int) -> torch.Tensor:
    """v^level of feature i, read through the level's remap (the compact table)."""
    if level == 0:
        return model.tables[0].weight[i, 1:]
    return model.tables[level].weight[int(getattr(model, f"remap_{level}")[i])]


def _min_rank_loop(model: RaFM, ids, values, low: bool = False):
    """y = w0 + sum_i w_i x_i + sum_{i<j} <v_i^(l), v_j^(l)> x_i x_j, l = min(l_i, l_j)."""
    out = []
    for b in range(ids.shape[0]):
        y = float(model.bias)
        for p in range(ids.shape[1]):
            i = int(ids[b, p])
            y += float(model.tables[0].weight[i, 0] * values[b, p])
            for q in range(p + 1, ids.shape[1]):
                j = int(ids[b, q])
                lv = 0 if low else min(int(model.level[i]), int(model.level[j]))
                y += float(_vec(model, i, lv) @ _vec(model, j, lv) * values[b, p] * values[b, q])
        out.append(y)
    return torch.tensor(out, dtype=torch.float64)


def test_levels_count_the_thresholds_exceeded():
    counts = np.array([99, 5, 50, 51, 500, 501, 10_000])
    assert rafm_levels(counts, (50, 500)).tolist() == [0, 0, 0, 1, 1, 2, 2]  # row 0: padding
    assert rafm_levels(counts, ()).tolist() == [0] * 7
    with pytest.raises(UserError, match="non-decreasing"):
        rafm_levels(counts, (500, 50))


def test_level_tables_hold_only_rows_at_or_above_their_level():
    model = _rafm()
    lv = model.level.long()
    for level in (1, 2):
        remap = getattr(model, f"remap_{level}").long()
        assert model.tables[level].num_rows == int((lv >= level).sum()) + 1
        assert sorted(remap[lv >= level].tolist()) == list(range(1, int((lv >= level).sum()) + 1))
        assert torch.all(remap[lv < level] == 0)
    dims = sum(t.num_rows * t.dim for t in model.tables)
    assert model.num_params() == dims + 1


def test_rafm_matches_the_min_rank_pair_loop():
    model, batch = _rafm(), _batch()
    with torch.no_grad():
        torch.testing.assert_close(
            model(batch.ids, batch.values), _min_rank_loop(model, batch.ids, batch.values)
        )


def test_rafm_low_is_the_fm_of_level_zero_factors():
    model, batch = _rafm(), _batch()
    with torch.no_grad():
        expected = _min_rank_loop(model, batch.ids, batch.values, low=True)
    torch.testing.assert_close(model.predict(batch.ids, batch.values, low=True), expected)


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_one_level_rafm_is_fm(task):
    rafm = _rafm(
        ranks=(4,), levels=torch.zeros(N, dtype=torch.int64), l2_linear=0.1, l2_factors=0.2
    )
    fm = FM(N, 4, make_table=plain_tables(torch.float64), l2_linear=0.1, l2_factors=0.2).double()
    with torch.no_grad():
        fm.table.weight.copy_(rafm.tables[0].weight)
        fm.bias.copy_(rafm.bias)
    batch = _batch()
    a, b = rafm.loss(batch, task), fm.loss(batch, task)
    torch.testing.assert_close(a[1], b[1])
    torch.testing.assert_close(a[0], b[0])


def test_distillation_gradients_reach_dependent_rows_only():
    model, batch = _rafm(), _batch(b=16)
    model.objective(batch, "binary")["distill"].backward()
    assert model.bias.grad is None or model.bias.grad == 0
    lv = model.level.long()
    in_batch = torch.zeros(N, dtype=torch.bool)
    in_batch[batch.ids.reshape(-1)] = True
    g0 = model.tables[0].weight.grad
    assert torch.all(g0[:, 0] == 0), "linear weights take no distillation gradient"
    dep0 = in_batch & (lv > 0)
    assert torch.all(g0[dep0, 1:].abs().sum(1) > 0) and torch.all(g0[~dep0] == 0)
    remap1 = model.remap_1.long()
    g1 = model.tables[1].weight.grad
    dep1 = remap1[in_batch & (lv > 1)]
    assert torch.all(g1[dep1].abs().sum(1) > 0)
    mask = torch.ones(g1.shape[0], dtype=torch.bool)
    mask[dep1] = False
    assert torch.all(g1[mask] == 0), "level-1 free rows take no distillation gradient"
    top = model.tables[2].weight.grad
    assert top is None or torch.all(top == 0), "the top level is never a student"


def test_distillation_student_and_teacher_are_the_truncated_models():
    model, batch = _rafm(distill_weight=1.0), _batch()
    parts = model.objective(batch, "regression")
    with torch.no_grad():
        full = _min_rank_loop(model, batch.ids, batch.values)
        low = _min_rank_loop(model, batch.ids, batch.values, low=True)
        # B_1: pairs with min level 0 at level 0, all others (both >= 1) at level 1
        b1 = []
        for b in range(len(batch)):
            y = float(model.bias)
            ids, x = batch.ids[b], batch.values[b]
            for p in range(len(ids)):
                y += float(model.tables[0].weight[ids[p], 0] * x[p])
                for q in range(p + 1, len(ids)):
                    lv = min(1, int(model.level[ids[p]]), int(model.level[ids[q]]))
                    y += float(
                        _vec(model, int(ids[p]), lv) @ _vec(model, int(ids[q]), lv) * x[p] * x[q]
                    )
            b1.append(y)
        b1 = torch.tensor(b1, dtype=torch.float64)
    expected = ((low - b1) ** 2).mean() + ((b1 - full) ** 2).mean()
    torch.testing.assert_close(parts["distill"], expected)


def test_padding_contributes_nothing():
    model, batch = _rafm(l2_linear=0.1, l2_factors=0.1), _batch()
    z = torch.zeros(len(batch), 2, dtype=torch.int64)
    padded = Batch(
        torch.cat([batch.ids, z], 1), torch.cat([batch.values, z.double()], 1), batch.label
    )
    with torch.no_grad():
        for t in model.tables:
            t.weight[0].normal_(0, 3.0)
    a, b = model.loss(batch, "binary"), model.loss(padded, "binary")
    torch.testing.assert_close(a[1], b[1])
    torch.testing.assert_close(a[0], b[0])
    b[0].backward()
    for t in model.tables:
        assert torch.all(t.weight.grad[0] == 0)


def test_gradients_reach_every_parameter():
    model, batch = _rafm(l2_factors=0.01), _batch(b=16)
    model.loss(batch, "binary")[0].backward()
    assert model.bias.grad != 0
    lv = model.level.long()
    used = batch.ids.reshape(-1).unique()
    assert torch.all(model.tables[0].weight.grad[used].abs() > 0)
    for level in (1, 2):
        rows = getattr(model, f"remap_{level}").long()[used[lv[used] >= level]]
        assert torch.all(model.tables[level].weight.grad[rows].abs().sum(1) > 0)


def test_predict_with_std_is_a_user_error():
    batch = _batch()
    with pytest.raises(UserError):
        _rafm().predict(batch.ids, batch.values, return_std=True)
