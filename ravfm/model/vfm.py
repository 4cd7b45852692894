"""Variational FM: a Gaussian posterior on every FM parameter, with grouped hierarchical priors.

Follows the design of cemoody/vfm (Moody 2017) with its defects fixed:
- the interaction sums pairs i<j only (the reference also adds i=j and counts each pair twice);
- a feature's posterior q = N(mu, exp(logvar)) is shrunk toward its field's learned prior
  N(m_g, exp(s_g)) by a closed-form KL (the reference adds the group and feature log-variances
  and puts a unit prior on each separately);
- the KL is scaled to the per-example ELBO: the reference multiplies a full-table KL by B/N on
  top of a mean loss, weighting it B times too much.

One table "vfm" of (N, M (2K+2)) rows: M component blocks (M = 1 unless a mixture, below),
each packed as [mu_w, mu_v (K), logvar_w, logvar_v (K)]. Dense parameters, per component: the
global bias's posterior (mean, log-variance, unit-normal prior) and per field g the prior mean
and log-variance of linear weights (G,) and latent vectors (G, K), learned by empirical Bayes
(no hyperprior). Training samples every parameter by reparameterisation,
independently per example (`train_samples` draws); evaluation uses the posterior means. For
regression, `train_samples=0` replaces the draws by the exact expectation of the squared error,
E_q[(y - f)^2] = (y - E f)^2 + Var f (the same objective, with no sampling noise in its gradient;
Var f as in `predict`). Rows start with log-variance `init_logvar`: far below the prior's
(e.g. -10 with priors near 0) the prior variances collapse onto the tiny posterior ones and
prune the factors, so start near log(init_std^2).

The prior's variance is per field and per factor (automatic relevance determination), so the
ELBO also switches factors off: a factor whose prior variance shrinks has its posteriors pulled
onto the prior. On MovieLens 100K (u1, k=10) with the noise variance learned (about 0.80), half
of the ten factors ended with mean mu^2 below 1e-3 and test RMSE was 0.928; the same model
without `learn_noise` (the MSE objective, i.e. a fixed noise variance of 1/2) and k=32 keeps
more factors alive and reaches 0.915. A single prior variance per field (no per-factor ARD)
did worse still (0.946).

Mixture (`components` M > 1). q is a uniform mixture of M mean-field Gaussians, each with its
own rows (a block of every table row), priors, bias and noise, started from its own random draw
and fitted to its own ELBO: the loss is the sum of the M negative ELBOs, so no gradient crosses
components and M independent fits cost one lookup and one set of tensor ops, M blocks wide.
Predictions average the components' means; the predictive variance is the mixture's (mean of
the component variances plus the variance of their means). One mean-field Gaussian settles in
one mode, and different starts settle in different ones (on ML-100K u1 five starts gave RMSE
0.914 to 0.920); averaging several is a cheap approximation to averaging over the posterior, as
MCMC does with its samples. ML-100K five folds: one Gaussian 0.9049, five 0.9019 at about 3.0
times the training time (bench/accuracy.py).

KL weighting. The per-example ELBO is (1/N_train) [sum_n E_q log p(y_n) - KL(q || p)]. A row i
that occurs c_i times in train adds lambda * KL_i / c_i per occurrence, averaged over the batch;
summed over an epoch (each example once) this is exactly sum_i lambda * KL_i, so the batch loss is
an unbiased estimate of the negative ELBO per example. c_i come from `frequencies`; without them
every occurrence weighs 1 (a count-weighted prior, not the ELBO). The bias KL is added / N_train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ravfm.batch import PAD_ID, Batch
from ravfm.errors import UserError
from ravfm.model.layers import (
    TableFactory,
    clip_output,
    count_params,
    output_range_buffer,
    pairwise,
    plain_tables,
)
from ravfm.model.losses import data_loss, gaussian_kl

__all__ = ["VFM", "vfm_init", "rank_by_uncertainty"]


def vfm_init(w: Tensor, k: int, std: float, logvar: float, components: int = 1) -> None:
    """Fill VFM rows (n, M (2K+2)) in place, each of the M blocks as mu_w 0, mu_v N(0, std^2),
    log-variances `logvar`."""
    blocks = w.view(w.shape[0], components, 2 * k + 2)
    blocks[..., 0].zero_()
    blocks[..., 1 : k + 1].normal_(0.0, std)
    blocks[..., k + 1 :].fill_(logvar)


class VFM(nn.Module):
    """Variational FM with per-field priors; `field_index` (F,) maps a column to its field.

    Internally every posterior tensor carries the component axis first: (M, B, F, K+1).
    """

    def __init__(
        self,
        num_rows: int,
        k: int,
        field_index: Sequence[int],
        *,
        n_train: int,
        frequencies: np.ndarray | None = None,
        make_table: TableFactory | None = None,
        init_std: float = 0.01,
        init_logvar: float = -10.0,
        lambda_bias: float = 1.0,
        lambda_linear: float = 1.0,
        lambda_latent: float = 1.0,
        train_samples: int = 1,
        learn_noise: bool = False,
        components: int = 1,
    ) -> None:
        super().__init__()
        make_table = make_table or plain_tables()
        if train_samples < 0:
            raise ValueError(f"train_samples={train_samples} must be >= 0 (0 = exact, regression)")
        if components < 1:
            raise ValueError(f"components={components} must be >= 1")
        self.k, self.n_train, self.train_samples = k, max(int(n_train), 1), int(train_samples)
        self.components = m = int(components)
        self.lambdas = (lambda_bias, lambda_linear, lambda_latent)
        self.table = make_table(
            "vfm", num_rows, m * (2 * k + 2), lambda w: vfm_init(w, k, init_std, init_logvar, m)
        )
        groups = max(field_index) + 1
        self.register_buffer("field_index", torch.as_tensor(field_index, dtype=torch.int64),
                             persistent=False)  # fmt: skip
        self.bias_mu = nn.Parameter(torch.zeros(m))  # (M,)
        output_range_buffer(self)
        self.bias_logvar = nn.Parameter(torch.full((m,), float(init_logvar)))
        self.prior_mu = nn.Parameter(torch.zeros(m, groups, k + 1))  # (M, G, K+1): [m_w, m_v]
        self.prior_logvar = nn.Parameter(torch.zeros(m, groups, k + 1))  # (M, G, K+1)
        # regression: log of each component's observation-noise variance (learned), or None = MSE
        self.noise_logvar = nn.Parameter(torch.zeros(m)) if learn_noise else None
        counts = np.ones(num_rows) if frequencies is None else np.asarray(frequencies)
        inv = 1.0 / np.maximum(counts.astype(np.float64), 1.0)
        self.register_buffer("inv_count", torch.as_tensor(inv, dtype=torch.float32),
                             persistent=False)  # fmt: skip
        # rows never seen in train keep their random init; at eval they answer with the prior
        self.register_buffer("unseen", torch.as_tensor(counts <= 0) if frequencies is not None
                             else torch.zeros(num_rows, dtype=torch.bool), persistent=False)  # fmt: skip

    def _split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """rows (B, F, M (2K+2)) -> posterior means, log-variances (M, B, F, K+1) each."""
        r = rows.unflatten(-1, (self.components, 2 * self.k + 2)).movedim(-2, 0)
        return r[..., : self.k + 1], r[..., self.k + 1 :]

    def _prior(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Each column's prior mean and log-variance per component, (M, 1, F, K+1) each."""
        pm, plv = self.prior_mu[:, self.field_index], self.prior_logvar[:, self.field_index]
        return pm.unsqueeze(1).to(dtype), plv.unsqueeze(1).to(dtype)

    def _posterior(self, ids: Tensor, cold_prior: bool) -> tuple[Tensor, Tensor]:
        """q's means and log-variances at ids (B, F) -> (M, B, F, K+1) each. With cold_prior
        (eval, predict), a row never seen in train (frequency 0) is its field's prior: its table
        row is an untrained init, not a posterior."""
        mu, logvar = self._split(self.table(ids))
        if not cold_prior:
            return mu, logvar
        cold = self.unseen[ids].unsqueeze(-1)  # (B, F, 1)
        pm, plv = self._prior(mu.dtype)
        return torch.where(cold, pm, mu), torch.where(cold, plv, logvar)

    def _fm(self, bias: Tensor, theta: Tensor, values: Tensor) -> Tensor:
        """bias (M, 1) or (M, B), theta (M, B, F, K+1) = [w, v], values (B, F) -> (M, B)."""
        x = values.to(theta.dtype)
        return bias + (theta[..., 0] * x).sum(-1) + pairwise(theta[..., 1:] * x.unsqueeze(-1))

    def _sample(self, mu: Tensor, logvar: Tensor, values: Tensor) -> Tensor:
        """One reparameterised draw of each component's output per example: (M, B)."""
        theta = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        eps = torch.randn(mu.shape[:2], dtype=mu.dtype, device=mu.device)
        bias = self.bias_mu.unsqueeze(1) + torch.exp(0.5 * self.bias_logvar).unsqueeze(1) * eps
        return self._fm(bias, theta, values)

    def _mean_output(self, mu: Tensor, values: Tensor) -> Tensor:
        """Each component's output at its posterior means: (M, B)."""
        return self._fm(self.bias_mu.unsqueeze(1), mu, values)

    def _check_fields(self, ids: Tensor) -> None:
        if ids.shape[1] != self.field_index.numel():
            raise ValueError(
                f"VFM built for {self.field_index.numel()} columns, got {ids.shape[1]}"
            )

    def forward(self, ids: Tensor, values: Tensor) -> Tensor:
        """Raw output (B,): one posterior sample while training, the posterior mean in eval
        (averaged over the components)."""
        self._check_fields(ids)
        mu, logvar = self._posterior(ids, not self.training)
        if self.training:
            return self._sample(mu, logvar, values).mean(0)
        return self._mean_output(mu, values).mean(0)

    def kl(self, ids: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
        """This batch's share of lambda-weighted KL(q || p) / N_train, summed over the
        components: ().

        ids (B, F); mu, logvar (M, B, F, K+1) the posterior rows at those ids.
        """
        lam_b, lam_w, lam_v = self.lambdas
        pm, plv = self._prior(mu.dtype)  # (M, 1, F, K+1): each column's group
        kl = gaussian_kl(mu, logvar, pm, plv)  # (M, B, F, K+1)
        per_occ = lam_w * kl[..., 0] + lam_v * kl[..., 1:].sum(-1)  # (M, B, F)
        weight = self.inv_count[ids].to(mu.dtype) * (ids != PAD_ID).to(mu.dtype)  # (B, F)
        rows = (per_occ * weight).sum() / ids.shape[0]
        zero = torch.zeros((), dtype=self.bias_mu.dtype, device=self.bias_mu.device)
        bias = gaussian_kl(self.bias_mu, self.bias_logvar, zero, zero).sum()
        return rows + lam_b * bias / self.n_train

    def loss(self, batch: Batch, task: str) -> tuple[Tensor, Tensor]:
        """Negative ELBO per example, summed over the components (each fits its own): the mean
        expected data loss under q + the KL share.

        Returns (loss (), raw (B,)): raw is the mean of the `train_samples` sampled outputs
        while training (the posterior mean with train_samples=0), the posterior mean in eval,
        averaged over the components.
        """
        self._check_fields(batch.ids)
        mu, logvar = self._posterior(batch.ids, not self.training)
        if not self.training:
            raws = self._mean_output(mu, batch.values)  # (M, B)
            data = self._data(raws, batch.label, task)
        elif self.train_samples == 0:
            if task != "regression":
                raise UserError(
                    "model.vfm.train_samples=0 (exact expected squared error) needs "
                    "task=regression; use 1 or more samples for binary"
                )
            raws, var = self._moments(mu, logvar, batch.values)
            sq = (batch.label.to(raws.dtype) - raws).pow(2) + var  # (M, B)
            data = self._nll(sq.mean(-1)).sum()
        else:
            draws = [self._sample(mu, logvar, batch.values) for _ in range(self.train_samples)]
            data = sum(self._data(r, batch.label, task) for r in draws) / len(draws)
            raws = torch.stack(draws).mean(0)
        return data + self.kl(batch.ids, mu, logvar), raws.mean(0)

    def _data(self, raws: Tensor, label: Tensor, task: str) -> Tensor:
        """Data term summed over the components (), each its mean BCE, MSE, or with a learned
        noise its Gaussian NLL; raws (M, B)."""
        label = label.to(raws.dtype).expand_as(raws)
        if task == "binary":
            return data_loss(raws, label, task) * self.components  # the mean over M x B
        return self._nll((raws - label).pow(2).mean(-1)).sum()

    def _nll(self, sq: Tensor) -> Tensor:
        """Each component's mean squared error sq (M,) -> mean -log N(y | f, 1/tau) (M,); sq
        itself without noise."""
        if self.noise_logvar is None:
            return sq
        s = self.noise_logvar.to(sq.dtype)
        return 0.5 * (math.log(2 * math.pi) + s + sq * torch.exp(-s))

    def _moments(self, mu: Tensor, logvar: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Each component's mean and exact variance (M, B) of the output; see `predict`."""
        x = values.to(mu.dtype)
        var = logvar.exp()
        m = mu[..., 1:] * x.unsqueeze(-1)  # (M, B, F, K)
        t = var[..., 1:] * (x * x).unsqueeze(-1)  # (M, B, F, K)
        big_m, big_t = m.sum(-2, keepdim=True), t.sum(-2)  # (M, B, 1, K), (M, B, K)
        pair = (t * (big_m - m).pow(2)).sum((-2, -1)) + 0.5 * (big_t.pow(2) - t.pow(2).sum(-2)).sum(
            -1
        )
        lin = (var[..., 0] * x * x).sum(-1)
        return self._mean_output(mu, values), self.bias_logvar.exp().unsqueeze(1) + lin + pair

    @torch.no_grad()
    def predict(
        self, ids: Tensor, values: Tensor, return_std: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Posterior-mean output (B,), clipped to `output_range`; with return_std also its exact
        predictive std (B,) (of the unclipped output).

        The std is of the raw output under q (model uncertainty; no observation noise),
        exact for the sum's variance: pairs sharing a feature co-vary. Per factor k with
        m_p = x_p mu_pk, t_p = x_p^2 var_pk, M = sum_p m_p, T = sum_p t_p:
        Var(sum_{p<q} x_p x_q v_pk v_qk) = sum_p t_p (M - m_p)^2 + (T^2 - sum_p t_p^2) / 2.
        With several components, q is their uniform mixture: the mean is the components' mean,
        the variance the mean of theirs plus the variance of their means (total variance).
        Assumes the F positions of an example hold distinct rows (padding aside).
        """
        self._check_fields(ids)
        mu, logvar = self._posterior(ids, True)
        if not return_std:
            return clip_output(self._mean_output(mu, values).mean(0), self.output_range)
        means, var = self._moments(mu, logvar, values)  # (M, B) each
        mean = means.mean(0)
        total = var.mean(0) + (means - mean).pow(2).mean(0)
        return clip_output(mean, self.output_range), total.sqrt()

    def num_params(self) -> int:
        return count_params(self)


@torch.no_grad()
def rank_by_uncertainty(model: VFM, ids: Tensor, values: Tensor, top: int | None = None) -> Tensor:
    """Active learning: candidate rows (B,) ordered by predictive variance, largest first.

    ids, values (B, F) -> LongTensor (min(top, B),) of row positions in the candidate batch.
    """
    _, std = model.predict(ids, values, return_std=True)
    order = torch.argsort(std, descending=True, stable=True)
    return order if top is None else order[:top]
