"""FM against its definition (Rendle 2010, eq. 1) written as literal loops, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ravfm.batch import Batch
from ravfm.errors import UserError
from ravfm.model.fm import FM
from ravfm.model.layers import PlainTable, pairwise, plain_tables

N, K = 50, 4


def _batch(b: int = 6, f: int = 5, seed: int = 0, dtype=torch.float64) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(N - 1, generator=g)[:f] + 1 for _ in range(b)])  # (B, F)
    values = torch.rand(b, f, generator=g, dtype=dtype) + 0.5
    label = (torch.rand(b, generator=g) > 0.5).to(dtype)
    return Batch(ids, values, label)


def _fm(seed: int = 0, **kw) -> FM:
    torch.manual_seed(seed)
    model = FM(N, K, make_table=plain_tables(torch.float64), init_std=0.3, **kw)
    with torch.no_grad():
        model.table.weight[:, 0].normal_(0, 0.5)  # non-zero linear weights
        model.bias.fill_(0.25)
    return model.double()


def _fm_loop(model: FM, ids, values):
    """y = w0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j, one example at a time."""
    w = model.table.weight.detach()
    out = []
    for b in range(ids.shape[0]):
        y = float(model.bias.detach())
        f = ids.shape[1]
        for i in range(f):
            y += float(w[ids[b, i], 0] * values[b, i])
            for j in range(i + 1, f):
                y += float(w[ids[b, i], 1:] @ w[ids[b, j], 1:] * values[b, i] * values[b, j])
        out.append(y)
    return torch.tensor(out, dtype=torch.float64)


def test_pairwise_matches_double_loop_over_i_less_than_j():
    u = torch.randn(7, 6, 5, dtype=torch.float64)
    loop = torch.zeros(7, dtype=torch.float64)
    for i in range(6):
        for j in range(i + 1, 6):
            loop += (u[:, i] * u[:, j]).sum(-1)
    torch.testing.assert_close(pairwise(u), loop, rtol=1e-12, atol=1e-12)


def test_fm_forward_matches_definition_loop():
    model, batch = _fm(), _batch()
    torch.testing.assert_close(
        model(batch.ids, batch.values),
        _fm_loop(model, batch.ids, batch.values),
        rtol=1e-10,
        atol=1e-12,
    )
    torch.testing.assert_close(
        model.predict(batch.ids, batch.values), model(batch.ids, batch.values)
    )


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_loss_is_data_loss_plus_l2_on_rows_used_per_occurrence(task):
    model, batch = _fm(l2_linear=0.1, l2_factors=0.01), _batch()
    loss, raw = model.loss(batch, task)
    w = model.table.weight.detach()[batch.ids]  # (B, F, K+1)
    data = (
        F.binary_cross_entropy_with_logits(raw, batch.label)
        if task == "binary"
        else ((raw - batch.label) ** 2).mean()
    )
    l2 = (0.1 * (w[..., 0] ** 2).sum() + 0.01 * (w[..., 1:] ** 2).sum()) / len(batch)
    torch.testing.assert_close(loss, data + l2)


def test_padding_contributes_nothing_to_output_loss_or_gradients():
    model, batch = _fm(l2_linear=0.1, l2_factors=0.1), _batch()
    pad_ids = torch.cat([batch.ids, torch.zeros(len(batch), 3, dtype=torch.int64)], 1)
    pad_vals = torch.cat([batch.values, torch.zeros(len(batch), 3, dtype=torch.float64)], 1)
    padded = Batch(pad_ids, pad_vals, batch.label)
    with torch.no_grad():
        model.table.weight[0].normal_(0, 1.0)  # padding row holds junk: it must not matter
    loss, raw = model.loss(batch, "binary")
    loss_p, raw_p = model.loss(padded, "binary")
    torch.testing.assert_close(raw_p, raw)
    torch.testing.assert_close(loss_p, loss)
    loss_p.backward()
    assert torch.all(model.table.weight.grad[0] == 0)


def test_gradients_reach_every_parameter_and_only_rows_used():
    model, batch = _fm(l2_factors=0.01), _batch()
    loss, _ = model.loss(batch, "regression")
    loss.backward()
    assert model.bias.grad is not None and model.bias.grad != 0
    grad = model.table.weight.grad
    used = torch.zeros(N, dtype=torch.bool)
    used[batch.ids.reshape(-1)] = True
    assert torch.all(grad[used].abs().sum(1) > 0)
    assert torch.all(grad[~used] == 0)


def test_plain_table_export_import_round_trip():
    t = PlainTable("t", 10, 3, lambda w: w.normal_())
    ids, rows = t.export_rows()
    assert ids.tolist() == list(range(10)) and rows.shape == (10, 3)
    u = PlainTable("t", 10, 3, lambda w: w.zero_())
    u.import_rows(ids[[2, 7]], rows[[2, 7]])
    torch.testing.assert_close(u(torch.tensor([[2, 7]])), t(torch.tensor([[2, 7]])))
    assert torch.all(u.weight[0] == 0)


def test_num_params_counts_table_rows_times_dim_plus_bias():
    assert FM(N, K).num_params() == N * (K + 1) + 1


def test_predict_with_std_is_a_user_error():
    batch = _batch(dtype=torch.float32)
    with pytest.raises(UserError, match="vfm"):
        FM(N, K).predict(batch.ids, batch.values, return_std=True)


@pytest.mark.parametrize("binary_values", [False, True])
def test_fused_bag_path_equals_the_plain_table_fm_with_l2_and_padding(binary_values):
    """FM on a SparseTable (table.bag: no (B, F, K+1) rows) = FM on a PlainTable, float64:
    outputs, loss with both L2 terms, and the gradient of every touched row."""
    from ravfm.batch import Batch
    from ravfm.distributed.embedding import table_factory
    from ravfm.distributed.world import World
    from ravfm.model.fm import FM
    from ravfm.model.layers import plain_tables

    torch.manual_seed(0)
    n, k, b, f = 50, 4, 16, 6
    ids = torch.randint(1, n, (b, f))
    ids[:3, -2:] = 0  # padding
    values = torch.rand(b, f, dtype=torch.float64)
    if binary_values:  # hashed categoricals: the L2 terms come from the same bag
        values = torch.ones(b, f, dtype=torch.float64)
    values[ids == 0] = 0.0
    batch = Batch(ids, values, (torch.rand(b) < 0.3).double())
    kw = {"init_std": 0.3, "l2_linear": 0.01, "l2_factors": 0.02}
    plain = FM(n, k, make_table=plain_tables(dtype=torch.float64), **kw).double()
    fused = FM(n, k, make_table=table_factory("sparse", World.single(), dtype=torch.float64),
               unit_values=binary_values, **kw)  # fmt: skip
    fused = fused.double()
    all_ids, rows = plain.table.export_rows()
    fused.table.import_rows(all_ids, rows)
    with torch.no_grad():
        plain.bias.fill_(0.1)
        fused.bias.fill_(0.1)
    assert hasattr(fused.table, "bag")
    torch.testing.assert_close(fused(ids, values), plain(ids, values), rtol=0, atol=1e-12)
    lp, rp = plain.loss(batch, "binary")
    lf, rf = fused.loss(batch, "binary")
    torch.testing.assert_close(lf, lp, rtol=0, atol=1e-12)
    lp.backward()
    lf.backward()
    g = fused.table.sparse_grad()
    dense = plain.table.weight.grad
    torch.testing.assert_close(g.grad, dense[g.rows], rtol=0, atol=1e-12)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[g.rows] = False
    assert (dense[untouched] == 0).all()
    assert (g.grad[g.rows == 0] == 0).all()  # padding is looked up but learns nothing
    torch.testing.assert_close(fused.bias.grad, plain.bias.grad, rtol=0, atol=1e-12)
