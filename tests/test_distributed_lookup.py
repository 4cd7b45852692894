"""Deduplicated lookup (ravfm.distributed.lookup) against literal loops."""

from __future__ import annotations

import pytest
import torch

from ravfm.distributed.lookup import bag, coalesce, dedupe, expand


def _ids(n: int = 500, hi: int = 60, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hi, (n,), generator=g)


@pytest.mark.parametrize("big", [False, True])
def test_dedupe_gives_sorted_unique_ids_inverse_and_segments(big):
    ids = _ids() + (2**40 if big else 0)  # int64 keys beyond int32 take the other path
    d = dedupe(ids)
    expected = sorted(set(ids.tolist()))
    assert d.uniq.tolist() == expected
    assert torch.equal(d.uniq[d.inv], ids)
    counts = {v: ids.tolist().count(v) for v in expected}
    assert d.counts.tolist() == [counts[v] for v in expected]
    for u, v in enumerate(expected):  # perm[crow[u]:crow[u+1]] are exactly the positions of v
        pos = sorted(d.perm[d.crow[u] : d.crow[u + 1]].tolist())
        assert pos == [i for i, x in enumerate(ids.tolist()) if x == v]


def test_dedupe_of_nothing():
    d = dedupe(torch.zeros(0, dtype=torch.int64))
    assert d.uniq.numel() == 0 and d.inv.numel() == 0 and d.crow.tolist() == [0]
    assert d.sum_rows(torch.zeros(0, 3)).shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_rows_matches_a_loop(dtype):
    ids = _ids(300, 40)
    values = torch.randn(300, 5, dtype=dtype)
    d = dedupe(ids)
    out = d.sum_rows(values)
    for u, v in enumerate(d.uniq.tolist()):
        ref = sum(values[i] for i in range(300) if ids[i] == v)
        torch.testing.assert_close(
            out[u],
            ref,
            rtol=1e-6 if dtype == torch.float32 else 1e-12,
            atol=1e-6 if dtype == torch.float32 else 1e-12,
        )


def test_coalesce_sums_duplicate_ids():
    ids = torch.tensor([5, 2, 5, 9, 2, 5])
    vals = torch.arange(12, dtype=torch.float64).view(6, 2)
    uniq, summed = coalesce(ids, vals)
    assert uniq.tolist() == [2, 5, 9]
    assert summed.tolist() == [[2 + 8, 3 + 9], [0 + 4 + 10, 1 + 5 + 11], [6, 7]]


def test_expand_backward_is_the_coalesced_gradient_of_a_gather():
    ids = _ids(200, 30)
    d = dedupe(ids)
    rows = torch.randn(d.uniq.numel(), 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(200, 4, dtype=torch.float64)
    (expand(rows, d) * w).sum().backward()
    ref_rows = rows.detach().clone().requires_grad_()
    (ref_rows[d.inv] * w).sum().backward()  # autograd's own index backward
    torch.testing.assert_close(rows.grad, ref_rows.grad, rtol=0, atol=1e-12)
    assert torch.equal(expand(rows.detach(), d), rows.detach()[d.inv])


@pytest.mark.parametrize("norms", [(), ((1, 4),), ((0, 1), (1, 4))])
def test_bag_matches_field_sums_group_norms_and_their_gradients(norms):
    b, f, dim = 6, 4, 4
    ids = _ids(b * f, 9)
    d = dedupe(ids)
    rows = torch.randn(d.uniq.numel(), dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(b * f, dtype=torch.float64, requires_grad=True)
    out = bag(rows, d, w, f, norms=norms)
    sums, nsq = out if norms else (out, None)
    ref_rows = rows.detach().clone().requires_grad_()
    ref_w = w.detach().clone().requires_grad_()
    r = ref_rows[d.inv].view(b, f, dim)  # the definition, loop-free but literal
    ref_sums = (ref_w.view(b, f, 1) * r).sum(1)
    ref_nsq = (
        torch.stack(
            [(ref_w.view(b, f) ** 2 * (r[..., lo:hi] ** 2).sum(-1)).sum(1) for lo, hi in norms], 1
        )
        if norms
        else None
    )
    for i in range(b):  # and one example by hand
        expected = sum(w[i * f + j].item() * rows[d.inv[i * f + j]].detach() for j in range(f))
        torch.testing.assert_close(sums[i].detach(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(sums, ref_sums, rtol=0, atol=1e-12)
    g1 = torch.randn(b, dim, dtype=torch.float64)
    loss, ref_loss = (sums * g1).sum(), (ref_sums * g1).sum()
    if norms:
        torch.testing.assert_close(nsq, ref_nsq, rtol=0, atol=1e-12)
        g2 = torch.randn(b, len(norms), dtype=torch.float64)
        loss, ref_loss = loss + (nsq * g2).sum(), ref_loss + (ref_nsq * g2).sum()
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(rows.grad, ref_rows.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=0, atol=1e-12)


def test_bag_norms_alone_get_their_gradient():
    b, f, dim = 5, 3, 4
    ids = _ids(b * f, 7, seed=2)
    d = dedupe(ids)
    rows = torch.randn(d.uniq.numel(), dim, dtype=torch.float64, requires_grad=True)
    w = (torch.arange(b * f) % 3 != 0).double()  # 0/1 weights, as one-hot fields and padding
    bag(rows, d, w, f, norms=((1, dim),))[1].sum().backward()  # no gradient reaches the sums
    hits = torch.zeros(d.uniq.numel(), dtype=torch.float64).index_add_(0, d.inv, w)
    expected = 2 * rows.detach() * hits[:, None]
    expected[:, 0] = 0  # column 0 is outside the group
    torch.testing.assert_close(rows.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_rows, m", [(50, 400), (1000, 300), (7, 1)])
def test_counting_dedupe_equals_the_sort(n_rows, m):
    """The counting sort (CPU training lookups) gives the same Dedup as torch.sort does, and
    leaves its scratch clean for the next call."""
    from ravfm.distributed.lookup import CountingScratch

    scratch = CountingScratch(n_rows)
    g = torch.Generator().manual_seed(n_rows + m)
    for _ in range(3):
        ids = torch.randint(0, n_rows, (m,), generator=g)
        a, b = dedupe(ids), dedupe(ids, scratch)
        for field in ("uniq", "inv", "crow"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert torch.equal(b.perm, torch.sort(ids, stable=True).indices)  # stable: positions
        for u in range(len(a.uniq)):  # ascending within a segment; the sort's in any order
            seg = slice(int(a.crow[u]), int(a.crow[u + 1]))
            assert torch.equal(a.perm[seg].sort().values, b.perm[seg])
        assert not scratch.counts.any() and not scratch.slot.any()
    bad = torch.zeros(n_rows, dtype=torch.int64)
    bad[-1] = n_rows  # one id past the table
    with pytest.raises(IndexError):
        dedupe(bad, scratch)
    assert not scratch.counts.any()
