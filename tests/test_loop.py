"""The training loop runs without Ray: fed a plain list of batches, it learns and steps the LR."""

from __future__ import annotations

import math

import pytest
import torch

from ravfm.batch import Batch
from ravfm.config import OptimConfig
from ravfm.distributed.embedding import table_factory
from ravfm.distributed.optim import build_optimizers
from ravfm.distributed.world import World
from ravfm.model.fm import FM
from ravfm.train.loop import improved
from ravfm.train.step import Position, Trainer, lr_factor


def test_lr_factor_warms_up_then_follows_the_schedule():
    warm = OptimConfig(warmup_steps=4, schedule="cosine")
    assert [lr_factor(s, 104, 0, warm) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 104, 0, warm) == pytest.approx(1.0)
    assert lr_factor(54, 104, 0, warm) == pytest.approx(0.5)  # half way down the cosine
    assert lr_factor(104, 104, 0, warm) == pytest.approx(0.0, abs=1e-12)
    step = OptimConfig(schedule="step", step_gamma=0.5)
    assert [lr_factor(0, 10, e, step) for e in range(3)] == [1.0, 0.5, 0.25]
    assert lr_factor(7, 10, 3, OptimConfig()) == 1.0


def test_improved_knows_which_way_each_metric_goes():
    assert (
        improved("auc", 0.8, None) and improved("auc", 0.81, 0.8) and not improved("auc", 0.79, 0.8)
    )
    assert improved("logloss", 0.4, 0.5) and not improved("rmse", 0.95, 0.9)


def _planted_batches(n_batches: int, b: int = 256, f: int = 4, rows: int = 64, seed: int = 0):
    """Clicks from a planted per-id effect, so a model that learns beats a coin (AUC > 0.5)."""
    effect = torch.randn(rows, generator=torch.Generator().manual_seed(123)) * 2  # fixed law
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, rows, (b, f), generator=g)
        p = torch.sigmoid(effect[ids].sum(dim=1))
        label = (torch.rand(b, generator=g) < p).float()
        out.append(Batch(ids, torch.ones(b, f), label, torch.arange(b)))
    return out


def test_trainer_learns_from_a_plain_list_and_sets_the_lr():
    torch.manual_seed(0)
    world = World.single()
    model = FM(64, 4, make_table=table_factory("sparse", world), unit_values=True)
    optim = OptimConfig(lr=0.1, schedule="step", step_gamma=0.5)
    sparse, dense = build_optimizers(model, optim)
    trainer = Trainer(model, sparse, dense, world, task="binary", optim=optim, num_fields=4,
                      total_steps=40)  # fmt: skip
    train, valid = _planted_batches(20), _planted_batches(4, seed=1)
    before = trainer.evaluate(valid)
    pos = Position()
    trainer.fit_epoch(train, pos)
    pos.next_epoch()
    state = trainer.fit_epoch(train, pos)
    after = trainer.evaluate(valid)
    assert pos.step == 40 and state.n == 20 * 256
    assert sparse.lr == pytest.approx(0.05)  # epoch 1 of the step schedule
    assert after["auc"] > 0.75 and after["auc"] > before["auc"] + 0.1
    assert after["logloss"] < before["logloss"]
    assert math.isfinite(after["logloss"]) and trainer.first_batch_seconds is not None
    assert len(pos.seen_rows()) == 20 * 256  # the row numbers a checkpoint would record


def test_on_step_can_stop_an_epoch_early():
    world = World.single()
    model = FM(64, 4, make_table=table_factory("sparse", world))
    sparse, dense = build_optimizers(model, OptimConfig())
    trainer = Trainer(model, sparse, dense, world, task="binary", optim=OptimConfig(), num_fields=4)
    pos = Position()
    trainer.fit_epoch(_planted_batches(10), pos, on_step=lambda p, s, t: p.step >= 3)
    assert pos.step == 3
