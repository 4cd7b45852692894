"""build_model wiring and the table contract every model keeps (one gather per table)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ravfm.batch import Batch
from ravfm.config import ModelConfig, RaFMConfig, VFMConfig
from ravfm.errors import UserError
from ravfm.model.layers import PlainTable
from ravfm.model.registry import build_model

N, F = 64, 4
FREQ = np.array([0] + [i * 7 % 120 for i in range(1, N)], dtype=np.int64)


class _Counting(PlainTable):
    calls: list[str] = []

    def forward(self, ids):
        _Counting.calls.append(self.name)
        return super().forward(ids)


def _factory(made: list):
    def make(name, num_rows, dim, init):
        made.append((name, num_rows, dim))
        return _Counting(name, num_rows, dim, init)

    return make


def _build(name: str, made: list | None = None, **kw) -> nn.Module:
    cfg = ModelConfig(name=name, k=4, rafm=RaFMConfig(ranks=(2, 6), thresholds=(30,)), **kw)
    return build_model(cfg, num_rows=N, num_fields=F, field_index=[0, 1, 2, 2], task="binary",
                       n_train=500, frequencies=FREQ,
                       make_table=None if made is None else _factory(made))  # fmt: skip


def _batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, N, (5, F), generator=g)
    ids[:, 3] = 0  # a padded multi-valued slot
    values = (ids != 0).float()
    return Batch(ids, values, torch.tensor([0, 1, 1, 0, 1.0]))


@pytest.mark.parametrize("name", ["fm", "vfm", "rafm"])
def test_models_get_every_table_from_the_factory_and_gather_once_per_table(name):
    made: list = []
    model = _build(name, made)
    assert not any(isinstance(m, nn.Embedding) for m in model.modules())
    _Counting.calls = []
    loss, raw = model.loss(_batch(), "binary")
    assert raw.shape == (5,) and loss.shape == () and torch.isfinite(loss)
    assert sorted(_Counting.calls) == sorted(n for n, _, _ in made), "one lookup per table"
    loss.backward()
    assert model.num_params() == sum(r * d for _, r, d in made) + sum(
        p.numel() for n, p in model.named_parameters() if "weight" not in n
    )


def test_tables_are_shaped_by_the_config():
    made: list = []
    _build("fm", made)
    assert made == [("fm", N, 5)]
    made.clear()
    _build("vfm", made)
    assert made == [("vfm", N, 10)]
    made.clear()
    _build("rafm", made)
    assert made == [("rafm_0", N, 3), ("rafm_1", int((FREQ > 30).sum()) + 1, 6)]


def test_rafm_without_frequencies_is_a_user_error():
    cfg = ModelConfig(name="rafm")
    with pytest.raises(UserError, match="frequency"):
        build_model(cfg, num_rows=N, num_fields=F, field_index=[0, 1, 2, 3], task="binary",
                    n_train=10)  # fmt: skip


def test_field_index_must_cover_every_column():
    with pytest.raises(ValueError):
        build_model(ModelConfig(), num_rows=N, num_fields=F, field_index=[0, 1], task="binary",
                    n_train=10)  # fmt: skip


@pytest.mark.parametrize("name", ["fm", "vfm", "rafm"])
def test_predict_is_deterministic_and_matches_eval_forward(name):
    model, b = _build(name), _batch()
    model.eval()
    torch.testing.assert_close(model.predict(b.ids, b.values), model(b.ids, b.values))
    torch.testing.assert_close(model.predict(b.ids, b.values), model.predict(b.ids, b.values))


def test_vfm_config_passes_its_settings_to_the_model():
    plain = _build("vfm")
    assert plain.noise_logvar is None and plain.train_samples == 1
    vfm = _build("vfm", vfm=VFMConfig(learn_noise=True, train_samples=0, lambda_latent=0.5))
    assert vfm.noise_logvar is not None and vfm.train_samples == 0
    assert vfm.lambdas == (1.0, 1.0, 0.5)
