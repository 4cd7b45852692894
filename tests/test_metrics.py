"""MetricState against direct formulas on the whole split; histogram AUC against exact ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ravfm.metrics import MetricState


def _exact_auc(score: np.ndarray, label: np.ndarray) -> float:
    """Mann-Whitney statistic with average ranks for ties (the slow twin)."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0  # average 1-based rank of the tie group
        i = j + 1
    pos = label > 0.5
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _data(n: int = 20_000, seed: int = 0):
    g = np.random.default_rng(seed)
    label = (g.random(n) < 0.3).astype(np.float32)
    raw = (g.normal(size=n) + 1.2 * label - 1.0).astype(np.float32)  # (N,) logits
    return torch.from_numpy(raw), torch.from_numpy(label)


def test_exact_auc_twin_on_a_hand_example():
    # positives 0.8, 0.4; negatives 0.4, 0.1 -> pairs: win, win, tie, win -> 3.5 / 4
    assert _exact_auc(np.array([0.8, 0.4, 0.4, 0.1]), np.array([1, 1, 0, 0])) == 0.875


def test_histogram_auc_is_within_its_bound_of_exact_and_under_1e5():
    raw, label = _data()
    st = MetricState("binary")
    st.update(raw, label, "binary")
    m = st.compute()
    exact = _exact_auc(torch.sigmoid(raw.double()).numpy(), label.numpy())
    assert abs(m["auc"] - exact) <= m["auc_error_bound"] + 1e-12
    assert abs(m["auc"] - exact) < 1e-5 and m["auc_error_bound"] < 1e-5


def test_coarse_histogram_auc_error_stays_within_its_bound():
    raw, label = _data(seed=1)
    st = MetricState("binary", bins=16)
    st.update(raw, label)
    m = st.compute()
    exact = _exact_auc(raw.double().numpy(), label.numpy())
    assert m["auc_error_bound"] > 1e-3  # coarse: the bound is doing real work here
    assert abs(m["auc"] - exact) <= m["auc_error_bound"]


def test_histogram_auc_counts_genuine_ties_as_half():
    raw = torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0, 1.0, -1.0, 0.0])
    label = torch.tensor([0, 1, 0, 0, 1, 0, 1, 1.0])
    st = MetricState("binary")
    st.update(raw, label)
    assert st.compute()["auc"] == pytest.approx(_exact_auc(raw.numpy(), label.numpy()), abs=1e-15)


def test_binary_sums_match_direct_formulas():
    raw, label = _data(n=1000)
    st = MetricState("binary")
    st.update(raw, label)
    m = st.compute()
    p = torch.sigmoid(raw.double())
    y = label.double()
    ll = -(y * torch.log(p) + (1 - y) * torch.log1p(-p)).mean()
    assert m["n"] == 1000
    assert m["logloss"] == pytest.approx(float(ll), rel=1e-10)
    assert m["brier"] == pytest.approx(float(((p - y) ** 2).mean()), rel=1e-10)
    assert m["label_mean"] == pytest.approx(float(y.mean()))


def test_regression_rmse_and_mae_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    pred, y = torch.rand(500, generator=g) * 5, torch.randint(1, 6, (500,), generator=g).float()
    st = MetricState("regression")
    st.update(pred, y, "regression")
    m = st.compute()
    err = pred.double() - y.double()
    assert m["rmse"] == pytest.approx(float(err.pow(2).mean().sqrt()), rel=1e-12)
    assert m["mae"] == pytest.approx(float(err.abs().mean()), rel=1e-12)
    assert "auc" not in m and st.to_tensor().numel() == 5


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_merge_of_shards_equals_metrics_of_the_whole(task):
    raw, label = _data(n=3000, seed=2)
    if task == "regression":
        label = label * 4 + 1
    whole = MetricState(task)
    whole.update(raw, label)
    shards = [MetricState(task) for _ in range(3)]
    for i, s in enumerate(shards):
        for lo in range(i * 1000, (i + 1) * 1000, 250):
            s.update(raw[lo : lo + 250], label[lo : lo + 250])
    merged = shards[0].merge(shards[1]).merge(shards[2])
    a, b = merged.compute(), whole.compute()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-12), k


def test_summed_vectors_round_trip_like_an_all_reduce():
    raw, label = _data(n=2000, seed=3)
    parts = []
    for lo in (0, 700):
        s = MetricState("binary", bins=4096)
        s.update(
            raw[lo : lo + 700] if lo == 0 else raw[lo:],
            label[lo : lo + 700] if lo == 0 else label[lo:],
        )
        parts.append(s.to_tensor())
    vec = parts[0] + parts[1]  # what all_reduce(SUM) produces
    assert vec.dtype == torch.float64 and vec.shape == (5 + 2 * 4096,)
    whole = MetricState("binary", bins=4096)
    whole.update(raw, label)
    assert MetricState.from_tensor(vec, "binary").compute() == pytest.approx(whole.compute())


def test_empty_and_one_class_states_give_nan_not_errors():
    assert math.isnan(MetricState("regression").compute()["rmse"])
    st = MetricState("binary")
    st.update(torch.zeros(4), torch.ones(4))
    assert math.isnan(st.compute()["auc"])


def test_merge_refuses_different_bins():
    with pytest.raises(ValueError):
        MetricState("binary", bins=8).merge(MetricState("binary", bins=16))
