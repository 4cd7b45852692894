"""One rank's optimizer steps and evaluation over any iterable of Batches; no Ray here.

One step: model.loss -> backward -> all-reduce dense gradients -> clip -> sparse and dense
optimizer steps -> metric sums. Every rank runs the same number of steps (`lockstep`), since a
row-sharded table makes every forward pass a collective. The epoch loop around it (epochs,
evaluation, early stopping, checkpoints) is ravfm.train.loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ravfm.batch import Batch
from ravfm.config import OptimConfig
from ravfm.distributed.dense import all_reduce_dense_grads
from ravfm.distributed.world import World
from ravfm.metrics import MetricState
from ravfm.model.layers import dense_parameters

__all__ = [
    "Position",
    "Trainer",
    "evaluate_model",
    "estimate_noise",
    "lockstep",
    "lr_factor",
    "merged",
]


@dataclass
class Position:
    """Where training stands: the data position that a checkpoint records."""

    epoch: int = 0  # current epoch (0-based)
    step: int = 0  # optimizer steps over the whole run
    epoch_samples: int = 0  # samples this rank trained in the current epoch
    seen: list[np.ndarray] = field(default_factory=list)  # row numbers consumed this epoch
    track_rows: bool = True  # keep `seen` (needed by mid-epoch checkpoints only)

    def seen_rows(self) -> np.ndarray:
        return np.concatenate(self.seen) if self.seen else np.zeros(0, dtype=np.int64)

    def next_epoch(self) -> None:
        self.epoch += 1
        self.epoch_samples = 0
        self.seen = []


def lockstep(batches: Iterable[Batch], world: World, empty: Batch | None) -> Iterator[Batch]:
    """Yield batches until every rank has run out; a rank that runs out first yields `empty`
    (B = 0) so it still joins the collectives of the others' steps. One MAX all-reduce per step
    when W > 1, so no rank leaves a row-sharded forward pass alone."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if world.size > 1:  # on the world's device: NCCL takes CUDA tensors only
            flag = torch.tensor([0.0 if batch is None else 1.0], device=world.device)
            world.all_reduce_(flag, op="max")
            if flag.item() == 0.0:
                return
        elif batch is None:
            return
        yield empty if batch is None else batch


def lr_factor(step: int, total_steps: int, epoch: int, cfg: OptimConfig) -> float:
    """Multiplier of the base learning rate: linear warm-up, then constant, cosine or step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine" and total_steps > cfg.warmup_steps:
        t = min(1.0, (step - cfg.warmup_steps) / (total_steps - cfg.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.step_gamma**epoch
    return 1.0


def _set_lr(opt: object, lr: float) -> None:
    if opt is None:
        return
    if hasattr(opt, "param_groups"):
        for g in opt.param_groups:
            g["lr"] = lr
    else:
        opt.lr = lr


class Trainer:
    """Model, optimizers and world for one rank; `fit_epoch` and `evaluate` are the loop."""

    def __init__(
        self,
        model: nn.Module,
        sparse_opt: object,
        dense_opt: object,
        world: World,
        *,
        task: str,
        optim: OptimConfig,
        num_fields: int,
        bf16: bool = False,
        total_steps: int = 0,
    ) -> None:
        self.empty = _empty_batch(num_fields)
        self.model, self.sparse_opt, self.dense_opt = model, sparse_opt, dense_opt
        self.world, self.task, self.optim, self.total_steps = world, task, optim, total_steps
        use_bf16 = bf16 and world.device.type == "cuda"
        self._autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
        )
        self._dense = dense_parameters(model)

    def step(self, batch: Batch, position: Position) -> torch.Tensor:
        """One optimizer step on `batch`; returns the raw outputs (B,) for metrics."""
        factor = lr_factor(position.step, self.total_steps, position.epoch, self.optim)
        _set_lr(self.sparse_opt, self.optim.lr * factor)
        _set_lr(self.dense_opt, self.optim.dense_lr * factor)
        self.model.train()
        for p in self._dense:
            p.grad = None
        with self._autocast():
            loss, raw = self.model.loss(batch, self.task)
        if len(batch) == 0:  # padding step of a rank that ran out: join collectives, change nothing
            loss = torch.nan_to_num(loss) * 0.0
        loss.backward()
        all_reduce_dense_grads(self.model, self.world)
        if self.optim.clip_norm > 0 and self._dense:
            torch.nn.utils.clip_grad_norm_(self._dense, self.optim.clip_norm)
        self.sparse_opt.step()
        if self.dense_opt is not None:
            self.dense_opt.step()
        position.step += 1
        position.epoch_samples += len(batch)
        return raw.detach()

    def fit_epoch(
        self,
        batches: Iterable[Batch],
        position: Position,
        on_step: Callable[[Position, MetricState, float], bool] | None = None,
    ) -> MetricState:
        """Train over `batches` once (lockstep across ranks). `on_step(position, metrics,
        seconds)` runs after every step and may return True to stop early (same on all ranks)."""
        state = MetricState(self.task)
        start = time.perf_counter()
        self.first_batch_seconds = None  # the stream's start-up latency (Ray Data planning)
        for batch in lockstep(batches, self.world, self.empty):
            if self.first_batch_seconds is None:
                self.first_batch_seconds = time.perf_counter() - start
            batch = batch.to(self.world.device, non_blocking=True)
            raw = self.step(batch, position)
            state.update(raw.float(), batch.label, self.task)
            if position.track_rows and batch.row is not None and len(batch):
                position.seen.append(batch.row.cpu().numpy())
            if on_step is not None and on_step(position, state, time.perf_counter() - start):
                break
        return state

    def evaluate(self, batches: Iterable[Batch], low: bool = False) -> dict:
        """Metrics over `batches` merged across ranks (sums all-reduced, computed once)."""
        return evaluate_model(
            self.model, batches, self.task, self.world, self.empty.ids.shape[1], low=low
        )


def _empty_batch(num_fields: int) -> Batch:
    return Batch(
        torch.zeros(0, num_fields, dtype=torch.int64),
        torch.zeros(0, num_fields),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.int64),
    )


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batches: Iterable[Batch],
    task: str,
    world: World,
    num_fields: int,
    low: bool = False,
) -> dict:
    """Metrics of `model`'s predictions over `batches` (B, num_fields) (lockstep across ranks,
    sums merged, computed once). low=True: RaFM-low."""
    model.eval()
    state = MetricState(task)
    for batch in lockstep(batches, world, _empty_batch(num_fields)):
        batch = batch.to(world.device, non_blocking=True)
        kw = {"low": True} if low else {}
        raw = model.predict(batch.ids, batch.values, **kw)
        state.update(raw.float(), batch.label, task)
    return merged(state, world).compute()


def merged(state: MetricState, world: World) -> MetricState:
    """The sum of every rank's metric state (an all-reduce of its sufficient statistics)."""
    if world.size == 1:
        return state
    vec = state.to_tensor()
    world.all_reduce_(vec)
    return MetricState.from_tensor(vec, state.task)


@torch.no_grad()
def estimate_noise(
    model: nn.Module, batches: Iterable[Batch], world: World, num_fields: int
) -> float:
    """VFM on ratings: the observation-noise variance of held-out rows, mean((y - mean)^2) minus
    the mean posterior variance of the output (floored at 1e-6), merged across ranks, so that
    posterior variance + noise variance matches the held-out squared error on average."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=world.device)  # sq error, variance, n
    for batch in lockstep(batches, world, _empty_batch(num_fields)):
        batch = batch.to(world.device, non_blocking=True)
        mean, std = model.predict(batch.ids, batch.values, return_std=True)
        err = (batch.label.to(mean) - mean).double()
        sums += torch.stack([(err * err).sum(), (std.double() ** 2).sum(),
                             torch.tensor(float(len(batch)), dtype=torch.float64,
                                          device=sums.device)])  # fmt: skip
    world.all_reduce_(sums)
    sq, var, n = sums.tolist()
    return max((sq - var) / max(n, 1.0), 1e-6)
