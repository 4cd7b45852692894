"""Variational FM against its definitions: KL by Monte Carlo, FM at zero variance, std by MC."""

from __future__ import annotations

import pytest
import torch

from ravfm.batch import Batch
from ravfm.errors import UserError
from ravfm.model.fm import FM
from ravfm.model.layers import plain_tables
from ravfm.model.losses import gaussian_kl
from ravfm.model.vfm import VFM, rank_by_uncertainty

N, K = 40, 3
FIELDS = [0, 1, 2, 3]


def _vfm(field_index=FIELDS, logvar: float | None = None, seed: int = 0, **kw) -> VFM:
    torch.manual_seed(seed)
    model = VFM(N, K, field_index, n_train=1000, make_table=plain_tables(torch.float64), **kw)
    model = model.double()
    with torch.no_grad():
        w = model.table.weight
        w[:, : K + 1].normal_(0, 0.5)
        w[:, K + 1 :].uniform_(-2.0, -0.5) if logvar is None else w[:, K + 1 :].fill_(logvar)
        model.bias_mu.fill_(0.3)
        model.bias_logvar.fill_(-3.0 if logvar is None else logvar)
        model.prior_mu.normal_(0, 0.2)
        model.prior_logvar.uniform_(-1, 0)
    return model


def _batch(b: int = 6, f: int = 4, seed: int = 0) -> Batch:
    """Distinct ids per example: column c draws from its own id range (field-disjoint)."""
    g = torch.Generator().manual_seed(seed)
    per = (N - 1) // f
    ids = torch.randint(0, per, (b, f), generator=g) + 1 + per * torch.arange(f)
    values = torch.rand(b, f, generator=g, dtype=torch.float64) + 0.5
    label = torch.rand(b, generator=g, dtype=torch.float64) * 4 + 1
    return Batch(ids, values, label)


def test_closed_form_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu_q, lv_q = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([-1.0, 0.5, -3.0])
    mu_p, lv_p = torch.tensor([0.0, 0.5, 1.5]), torch.tensor([0.0, -0.5, 0.2])
    mu_q, lv_q, mu_p, lv_p = (t.double() for t in (mu_q, lv_q, mu_p, lv_p))
    z = mu_q + (0.5 * lv_q).exp() * torch.randn(400_000, 3, generator=g, dtype=torch.float64)

    def logpdf(x, mu, lv):
        return -0.5 * (lv + (x - mu) ** 2 / lv.exp() + torch.log(torch.tensor(2 * torch.pi)))

    mc = (logpdf(z, mu_q, lv_q) - logpdf(z, mu_p, lv_p)).mean(0)
    torch.testing.assert_close(gaussian_kl(mu_q, lv_q, mu_p, lv_p), mc, rtol=0.02, atol=5e-3)


def test_zero_posterior_variance_vfm_is_fm_on_the_means():
    vfm, batch = _vfm(logvar=-80.0), _batch()
    fm = FM(N, K, make_table=plain_tables(torch.float64)).double()
    with torch.no_grad():
        fm.table.weight.copy_(vfm.table.weight[:, : K + 1])
        fm.bias.copy_(vfm.bias_mu[0])
    vfm.train()
    sampled = vfm(batch.ids, batch.values)
    expected = fm(batch.ids, batch.values)
    torch.testing.assert_close(sampled, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vfm.predict(batch.ids, batch.values), expected)


def test_predictive_mean_and_std_match_a_large_monte_carlo():
    vfm, batch = _vfm(), _batch(b=5)
    mean, std = vfm.predict(batch.ids, batch.values, return_std=True)
    g = torch.Generator().manual_seed(1)
    s = 200_000
    w = vfm.table.weight.detach()
    mu, sd = w[batch.ids, : K + 1], (0.5 * w[batch.ids, K + 1 :]).exp()  # (B, F, K+1)
    theta = mu + sd * torch.randn(s, *mu.shape, generator=g, dtype=torch.float64)  # (S, B, F, K+1)
    x = batch.values
    y = (theta[..., 0] * x).sum(-1)
    for i in range(x.shape[1]):  # the definition: pairs i<j only
        for j in range(i + 1, x.shape[1]):
            y += (theta[..., i, 1:] * theta[..., j, 1:]).sum(-1) * x[:, i] * x[:, j]
    bias_sd = float((0.5 * vfm.bias_logvar.detach()).exp())
    y += float(vfm.bias_mu.detach()) + bias_sd * torch.randn(s, 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(mean, y.mean(0), rtol=0, atol=4 * float(std.max()) / s**0.5)
    torch.testing.assert_close(std, y.std(0), rtol=0.015, atol=0)


def test_batch_kl_summed_over_an_epoch_is_the_full_kl():
    n = 60
    data = _batch(b=n, seed=3)
    counts = torch.bincount(data.ids.reshape(-1), minlength=N).numpy()
    vfm = _vfm(frequencies=counts, lambda_bias=0.0, lambda_linear=0.7, lambda_latent=1.3)
    epoch = sum(
        vfm.kl(b.ids, *vfm._split(vfm.table(b.ids))) * len(b)
        for b in (data.slice(lo, lo + 16) for lo in range(0, n, 16))
    )
    w = vfm.table.weight.detach()
    full = torch.zeros((), dtype=torch.float64)
    for col in range(data.ids.shape[1]):  # field-disjoint ids: each row has one group
        g = FIELDS[col]
        for r in data.ids[:, col].unique():
            kl = gaussian_kl(
                w[r, : K + 1], w[r, K + 1 :], vfm.prior_mu[0, g], vfm.prior_logvar[0, g]
            )
            full += 0.7 * kl[0] + 1.3 * kl[1:].sum()
    # rtol: the 1/c_i weights are stored in float32
    torch.testing.assert_close(epoch.detach(), full.detach(), rtol=1e-6, atol=0)


def test_padding_contributes_nothing_to_mean_std_kl_or_gradients():
    narrow = _vfm(field_index=[0, 1, 2])
    wide = _vfm(field_index=[0, 1, 2, 2, 2])  # a multi-valued field padded to three columns
    wide.load_state_dict(narrow.state_dict())
    with torch.no_grad():
        wide.table.weight[0].normal_(0, 3.0)  # junk in the padding row must not matter
    b = _batch(f=3)
    zeros = torch.zeros(len(b), 2, dtype=torch.int64)
    padded = Batch(torch.cat([b.ids, zeros], 1), torch.cat([b.values, zeros.double()], 1), b.label)
    for a, c in zip(
        narrow.predict(b.ids, b.values, True), wide.predict(padded.ids, padded.values, True)
    ):
        torch.testing.assert_close(a, c)
    narrow.eval(), wide.eval()
    torch.testing.assert_close(narrow.loss(b, "regression")[0], wide.loss(padded, "regression")[0])
    wide.train()
    wide.loss(padded, "regression")[0].backward()
    assert torch.all(wide.table.weight.grad[0] == 0)


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_gradients_reach_every_parameter(task):
    vfm, batch = _vfm(), _batch()
    if task == "binary":
        batch.label = (batch.label > 3).double()
    vfm.train()
    loss, raw = vfm.loss(batch, task)
    assert raw.shape == (len(batch),)
    loss.backward()
    for name, p in vfm.named_parameters():
        assert p.grad is not None, name
        if name == "table.weight":
            used = p.grad[batch.ids.unique()]
            assert torch.all(used.abs() > 0), "every column of every used row"
        else:
            assert torch.all(p.grad.abs() > 0), name


def test_eval_loss_uses_posterior_means():
    vfm, batch = _vfm(), _batch()
    vfm.eval()
    _, raw = vfm.loss(batch, "regression")
    torch.testing.assert_close(raw, vfm.predict(batch.ids, batch.values))


def test_rank_by_uncertainty_orders_candidates_by_predictive_std():
    vfm, batch = _vfm(), _batch(b=8)
    with torch.no_grad():
        vfm.table.weight[batch.ids[5], K + 1 :] = 1.0  # candidate 5: very uncertain rows
    _, std = vfm.predict(batch.ids, batch.values, return_std=True)
    order = rank_by_uncertainty(vfm, batch.ids, batch.values)
    assert order.dtype == torch.int64 and order[0] == 5
    assert torch.all(std[order][:-1] >= std[order][1:])
    assert rank_by_uncertainty(vfm, batch.ids, batch.values, top=3).tolist() == order[:3].tolist()


def test_num_params_counts_rows_and_priors():
    vfm = VFM(N, K, FIELDS, n_train=10)
    assert vfm.num_params() == N * (2 * K + 2) + 2 + 2 * len(FIELDS) * (K + 1)


def test_exact_expected_squared_error_matches_many_reparameterised_samples():
    vfm, batch = _vfm(train_samples=0), _batch(b=5)
    vfm.train()
    exact, raw = vfm.loss(batch, "regression")
    torch.testing.assert_close(raw, vfm.predict(batch.ids, batch.values))
    vfm.train_samples = 1
    torch.manual_seed(0)
    r = 20_000  # the batch repeated: one draw per copy, and the KL share is unchanged
    many = Batch(batch.ids.repeat(r, 1), batch.values.repeat(r, 1), batch.label.repeat(r))
    sampled, _ = vfm.loss(many, "regression")
    torch.testing.assert_close(sampled, exact, rtol=0.02, atol=0)


def test_exact_expectation_is_refused_for_binary():
    vfm, batch = _vfm(train_samples=0), _batch()
    with pytest.raises(UserError, match="train_samples=0"):
        vfm.loss(Batch(batch.ids, batch.values, (batch.label > 3).double()), "binary")


def test_learned_noise_loss_is_the_gaussian_negative_log_likelihood():
    vfm, batch = _vfm(learn_noise=True), _batch()
    with torch.no_grad():
        vfm.noise_logvar.fill_(-0.4)
    vfm.eval()
    loss, raw = vfm.loss(batch, "regression")
    mu, logvar = vfm._split(vfm.table(batch.ids))
    kl = vfm.kl(batch.ids, mu, logvar)
    sd = torch.tensor(-0.4, dtype=torch.float64).mul(0.5).exp()
    nll = -torch.distributions.Normal(raw, sd).log_prob(batch.label).mean()
    torch.testing.assert_close(loss - kl, nll)


def test_learned_noise_exact_expectation_matches_sampled_log_densities():
    vfm, batch = _vfm(learn_noise=True, train_samples=0), _batch(b=5)
    with torch.no_grad():
        vfm.noise_logvar.fill_(0.3)
    vfm.train()
    exact, _ = vfm.loss(batch, "regression")
    vfm.train_samples = 1
    torch.manual_seed(0)
    r = 20_000
    many = Batch(batch.ids.repeat(r, 1), batch.values.repeat(r, 1), batch.label.repeat(r))
    sampled, _ = vfm.loss(many, "regression")
    torch.testing.assert_close(sampled, exact, rtol=0.01, atol=0)


def test_noise_precision_is_learned_only_on_request_and_gets_a_gradient():
    assert _vfm().noise_logvar is None
    vfm, batch = _vfm(learn_noise=True, train_samples=0), _batch()
    vfm.train()
    vfm.loss(batch, "regression")[0].backward()
    assert vfm.noise_logvar.grad is not None and vfm.noise_logvar.grad.abs() > 0


def test_rows_unseen_in_train_answer_with_their_field_prior_in_eval():
    batch = _batch(b=8)
    counts = torch.bincount(batch.ids.reshape(-1), minlength=N).numpy()
    cold = batch.ids[0, 1]  # one row of field 1 that train never saw
    counts[cold.item()] = 0
    vfm = _vfm(frequencies=counts)
    ref = _vfm(frequencies=None)  # the same weights, every row taken as seen
    with torch.no_grad():
        ref.table.weight[cold, : K + 1] = vfm.prior_mu[0, FIELDS[1]]
        ref.table.weight[cold, K + 1 :] = vfm.prior_logvar[0, FIELDS[1]]
    for a, b in zip(
        vfm.predict(batch.ids, batch.values, True), ref.predict(batch.ids, batch.values, True)
    ):
        torch.testing.assert_close(a, b)
    plain = _vfm(frequencies=None).train()
    vfm.train()  # training reads the table row itself (the KL pulls it toward the prior)
    torch.manual_seed(0)
    ours = vfm(batch.ids, batch.values)
    torch.manual_seed(0)
    torch.testing.assert_close(ours, plain(batch.ids, batch.values))


M = 3  # mixture components


def _mixture(seed: int = 0, **kw) -> VFM:
    torch.manual_seed(seed)
    model = VFM(N, K, FIELDS, n_train=1000, make_table=plain_tables(torch.float64),
                components=M, **kw).double()  # fmt: skip
    with torch.no_grad():
        w = model.table.weight.view(N, M, 2 * K + 2)
        w[..., : K + 1].normal_(0, 0.5)
        w[..., K + 1 :].uniform_(-2.0, -0.5)
        model.bias_mu.normal_(0.3, 0.2)
        model.bias_logvar.uniform_(-4.0, -2.0)
        model.prior_mu.normal_(0, 0.2)
        model.prior_logvar.uniform_(-1, 0)
        if model.noise_logvar is not None:
            model.noise_logvar.uniform_(-1, 0)
    return model


def _component(mix: VFM, m: int, **kw) -> VFM:
    """Component m of a mixture as a one-component VFM (the slow twin: fitted on its own)."""
    one = VFM(N, K, FIELDS, n_train=1000, make_table=plain_tables(torch.float64), **kw).double()
    block = slice(m * (2 * K + 2), (m + 1) * (2 * K + 2))
    with torch.no_grad():
        one.table.weight.copy_(mix.table.weight[:, block])
        for name in ("bias_mu", "bias_logvar", "prior_mu", "prior_logvar", "noise_logvar"):
            if getattr(one, name) is not None:
                getattr(one, name).copy_(getattr(mix, name)[m : m + 1])
    return one


@pytest.mark.parametrize("kw", [{}, {"learn_noise": True}])
def test_mixture_loss_is_the_sum_of_its_components_fitted_alone(kw):
    mix, batch = _mixture(train_samples=0, **kw), _batch()
    parts = [_component(mix, m, train_samples=0, **kw) for m in range(M)]
    for training in (True, False):
        for model in (mix, *parts):
            model.train(training)
        loss, raw = mix.loss(batch, "regression")
        outs = [p.loss(batch, "regression") for p in parts]
        torch.testing.assert_close(loss, sum(o[0] for o in outs))
        torch.testing.assert_close(raw, torch.stack([o[1] for o in outs]).mean(0))
    binary = Batch(batch.ids, batch.values, (batch.label > 3).double())
    mix.eval()
    torch.testing.assert_close(
        mix.loss(binary, "binary")[0], sum(p.eval().loss(binary, "binary")[0] for p in parts)
    )


def test_mixture_gradients_stay_in_each_components_block():
    mix, batch = _mixture(train_samples=0), _batch()
    mix.train()
    mix.loss(batch, "regression")[0].backward()
    part = _component(mix, 1, train_samples=0).train()
    part.loss(batch, "regression")[0].backward()
    block = slice(2 * K + 2, 2 * (2 * K + 2))
    torch.testing.assert_close(mix.table.weight.grad[:, block], part.table.weight.grad)
    torch.testing.assert_close(mix.prior_mu.grad[1:2], part.prior_mu.grad)
    torch.testing.assert_close(mix.bias_mu.grad[1:2], part.bias_mu.grad)


def test_mixture_predictive_mean_and_std_match_a_large_monte_carlo():
    mix, batch = _mixture(), _batch(b=5)
    mean, std = mix.predict(batch.ids, batch.values, return_std=True)
    g = torch.Generator().manual_seed(2)
    s = 300_000
    comp = torch.randint(0, M, (s,), generator=g)  # which component each draw comes from
    w = mix.table.weight.detach().view(N, M, 2 * K + 2)[batch.ids]  # (B, F, M, 2K+2)
    rows = w.permute(2, 0, 1, 3)[comp]  # (S, B, F, 2K+2)
    theta = rows[..., : K + 1] + (0.5 * rows[..., K + 1 :]).exp() * torch.randn(
        rows[..., : K + 1].shape, generator=g, dtype=torch.float64
    )
    x = batch.values
    y = (theta[..., 0] * x).sum(-1)
    for i in range(x.shape[1]):  # the definition: pairs i<j only
        for j in range(i + 1, x.shape[1]):
            y += (theta[..., i, 1:] * theta[..., j, 1:]).sum(-1) * x[:, i] * x[:, j]
    bias_sd = (0.5 * mix.bias_logvar.detach()).exp()[comp].unsqueeze(1)
    y += mix.bias_mu.detach()[comp].unsqueeze(1)
    y += bias_sd * torch.randn(s, 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(mean, y.mean(0), rtol=0, atol=4 * float(std.max()) / s**0.5)
    torch.testing.assert_close(std, y.std(0), rtol=0.015, atol=0)
    means = torch.stack([_component(mix, m).predict(batch.ids, batch.values) for m in range(M)])
    assert torch.all(std > means.std(0, correction=0)), "the spread of the components counts"


def test_mixture_table_holds_every_component_and_counts_its_parameters():
    mix = VFM(N, K, FIELDS, n_train=10, components=M)
    assert mix.table.dim == M * (2 * K + 2)
    assert mix.num_params() == N * M * (2 * K + 2) + 2 * M + 2 * M * len(FIELDS) * (K + 1)
    blocks = mix.table.weight.detach().view(N, M, 2 * K + 2)
    assert not torch.equal(blocks[:, 0, 1 : K + 1], blocks[:, 1, 1 : K + 1]), "distinct starts"
    with pytest.raises(ValueError, match="components=0"):
        VFM(N, K, FIELDS, n_train=10, components=0)
