"""The epoch loop of one rank, the same in one process and in a Ray Train worker; no Ray here.

`fit(run)`: build the model and optimizers, start from the newest checkpoint of the run (or the
one to resume from), then for each epoch: train (skipping the rows a mid-epoch checkpoint had
already trained), merge the train metrics, evaluate on valid, keep the history and the best
epoch, checkpoint, and stop early when the validation metric stopped improving. At the end the
weights of the best validation epoch are restored (and written as the final checkpoint), and
the test split is evaluated with them. Returns the run summary (rank 0 also writes it).

A host supplies what differs: the world, a Feed (how rows reach this rank), and hooks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ravfm.config import RunConfig, to_dict
from ravfm.distributed.optim import build_optimizers
from ravfm.distributed.world import World
from ravfm.runtime import old_objects_frozen
from ravfm.storage import Store
from ravfm.train.checkpoint import latest_checkpoint, load_checkpoint, load_seen, save_checkpoint
from ravfm.train.feed import Feed
from ravfm.train.setup import build_for_training, early_stopping_metric
from ravfm.train.step import Position, Trainer, estimate_noise, merged
from ravfm.train.telemetry import Telemetry

__all__ = ["Run", "fit", "improved", "checkpoint_name", "noise_holdout"]


def improved(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new > best if metric == "auc" else new < best


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def noise_holdout(cfg: RunConfig, has_valid: bool) -> int:
    """VFM on ratings estimates its noise variance on held-out rows (unless it learns it): the
    valid split, or, when the data has none, one train row in this many kept out of training."""
    vfm = cfg.model.name == "vfm" and cfg.task == "regression"
    return 20 if vfm and not cfg.model.vfm.learn_noise and not has_valid else 0


def _noise(run: Run, st: _State) -> dict | None:
    """{"noise_var", "noise_from"} for VFM on ratings, else None."""
    cfg = run.cfg
    if cfg.model.name != "vfm" or cfg.task != "regression":
        return None
    if cfg.model.vfm.learn_noise:
        var = float(st.model.noise_logvar.detach().exp().mean())
        return {"noise_var": var, "noise_from": "learned"}
    where = "valid" if run.feed.has("valid") else "holdout"
    var = estimate_noise(st.model, run.feed.evaluate(where) or [], run.world, st.spec.num_fields)
    held = "5% of train (held out)" if where == "holdout" else "valid"
    return {"noise_var": var, "noise_from": held}


@dataclass
class Run:
    """What the epoch loop needs from its host.

    resume: a checkpoint to start from when the run has none of its own; init: a checkpoint
    whose weights start a new run (warm start; its optimizer state too unless reset_optimizer);
    on_step(position): after every step (fault injection); on_restore(meta, history): after
    a checkpoint was loaded (the Ray worker records restarts); show: prints progress lines."""

    cfg: RunConfig
    spec_dir: str
    run_dir: str
    world: World
    feed: Feed
    n_train: int
    resume: str | None = None
    init: str | None = None
    reset_optimizer: bool = False
    on_step: Callable[[Position], None] | None = None
    on_restore: Callable[[dict, dict], None] | None = None
    show: Callable[[str], None] | None = None
    extra_summary: dict = dataclasses.field(default_factory=dict)


class _State:
    """The model, its optimizers and the loop's position and history on this rank."""

    def __init__(self, run: Run) -> None:
        cfg, world = run.cfg, run.world
        self.model, self.spec = build_for_training(cfg, run.spec_dir, world, n_train=run.n_train)
        self.sparse_opt, self.dense_opt = build_optimizers(self.model, cfg.optim)
        per_step = cfg.train.batch_size * world.size
        self.steps_per_epoch = max(1, math.ceil(run.n_train / per_step))
        self.trainer = Trainer(
            self.model, self.sparse_opt, self.dense_opt, world, task=cfg.task, optim=cfg.optim,
            num_fields=self.spec.num_fields, bf16=cfg.train.bf16,
            total_steps=self.steps_per_epoch * cfg.train.epochs,
        )  # fmt: skip
        self.position = Position(track_rows=cfg.train.checkpoint_every > 0)
        self.history: dict[str, Any] = {}
        self.skip: np.ndarray | None = None
        self.started_from: dict | None = None
        self.timings: dict[str, float] = {}  # seconds by phase, for the summary
        self.noise: dict | None = None  # VFM on ratings: noise variance, saved in checkpoints

    def load(self, path: str, *, optimizers: bool = True) -> dict:
        return load_checkpoint(
            path,
            model=self.model,
            sparse_opt=self.sparse_opt if optimizers else None,
            dense_opt=self.dense_opt if optimizers else None,
        )


def _agree(world: World, value: Any) -> Any:
    """Rank 0's value on every rank (every rank must load the same checkpoint)."""
    return world.broadcast_object(value)


def _restore(run: Run, st: _State) -> None:
    """Continue the run's own newest checkpoint, else --resume; or warm-start from --init-from."""
    start = None
    if run.world.rank == 0:
        start = latest_checkpoint(Store(run.run_dir).url_of("checkpoints"))
        if start is None and run.resume:
            start = latest_checkpoint(run.resume)
    start = _agree(run.world, start)
    if start:
        meta = st.load(start)
        pos = meta["position"]
        st.position.epoch, st.position.step = pos["epoch"], pos["step"]
        st.history = meta.get("history", {})
        if pos.get("mid_epoch"):
            st.skip = load_seen(meta)
            if run.world.rank == 0:  # the union of all ranks' seen rows, counted once
                st.position.epoch_samples = int(st.skip.size)
                if st.position.track_rows:
                    st.position.seen = [st.skip]
        st.started_from = {"resumed_from": meta["path"], "step": pos["step"]}
        if run.on_restore is not None:
            run.on_restore(meta, st.history)
    elif run.init:
        meta = st.load(run.init, optimizers=not run.reset_optimizer)
        st.started_from = {
            "init_from": meta["path"],
            "init_step": meta["step"],
            "reset_optimizer": run.reset_optimizer,
        }
        st.history["init_from"] = st.started_from


def _checkpoint(run: Run, st: _State, mid_epoch: bool, protect: tuple[str, ...] = ()) -> str:
    pos = st.position
    manifest = {
        "epoch": pos.epoch,
        "position": {"epoch": pos.epoch, "step": pos.step, "mid_epoch": mid_epoch},
        "config": to_dict(run.cfg),
        "task": run.cfg.task,
        "n_train": run.n_train,
        "model": run.cfg.model.name,
        "history": st.history,
        **(st.noise or {}),
    }
    return save_checkpoint(
        Store(run.run_dir).url_of("checkpoints"),
        pos.step,
        model=st.model,
        sparse_opt=st.sparse_opt,
        dense_opt=st.dense_opt,
        world=run.world,
        manifest=manifest,
        spec_dir=run.spec_dir,
        seen=pos.seen_rows() if mid_epoch else None,
        keep=run.cfg.train.keep_checkpoints,
        protect=protect,
    )


def _world_sum(world: World, n: int) -> int:
    t = torch.tensor([float(n)], dtype=torch.float64, device=world.device)
    world.all_reduce_(t)
    return int(t.item())


def _epoch(run: Run, st: _State, telemetry: Telemetry) -> bool:
    """Train and validate one epoch; returns True when training should stop."""
    cfg, world, pos = run.cfg, run.world, st.position

    def on_step(p: Position, state: Any, seconds: float) -> bool:
        telemetry.step(p, state, seconds)
        if run.on_step is not None:
            run.on_step(p)
        if cfg.train.checkpoint_every and p.step % cfg.train.checkpoint_every == 0:
            _checkpoint(run, st, mid_epoch=True, protect=_best(st))
        return bool(cfg.train.max_steps and p.step >= cfg.train.max_steps)

    t0 = time.perf_counter()
    state = st.trainer.fit_epoch(run.feed.train(pos.epoch, st.skip), pos, on_step)
    train_metrics = merged(state, world).compute()
    seconds = time.perf_counter() - t0
    batches = run.feed.evaluate("valid")
    valid = st.trainer.evaluate(batches) if batches is not None else {}
    st.noise = _noise(run, st)
    valid_seconds = time.perf_counter() - t0 - seconds
    st.skip = None
    record = {
        "epoch": pos.epoch,
        "train": train_metrics,
        "valid": valid,
        "seconds": seconds,
        "valid_seconds": valid_seconds,
        "first_batch_seconds": st.trainer.first_batch_seconds or 0.0,
        "seen": _world_sum(world, pos.epoch_samples),
        **(st.noise or {}),
    }
    st.history.setdefault("epochs", []).append(record)
    telemetry.epoch(pos, record)
    metric = early_stopping_metric(cfg)
    value, h = valid.get(metric), st.history
    if value is not None and improved(metric, value, h.get("best")):
        h.update(best=value, best_epoch=pos.epoch, bad_epochs=0)
        h["best_checkpoint"] = checkpoint_name(pos.step)  # the one written just below
    elif value is not None:
        h["bad_epochs"] = h.get("bad_epochs", 0) + 1
    pos.next_epoch()
    t1 = time.perf_counter()
    _checkpoint(run, st, mid_epoch=False, protect=_best(st))
    st.timings["checkpoint"] = st.timings.get("checkpoint", 0.0) + time.perf_counter() - t1
    patience = cfg.train.early_stopping_patience
    return bool(cfg.train.max_steps and pos.step >= cfg.train.max_steps) or bool(
        patience and h.get("bad_epochs", 0) >= patience
    )


def _best(st: _State) -> tuple[str, ...]:
    name = st.history.get("best_checkpoint")
    return (name,) if name else ()


def _restore_best(run: Run, st: _State) -> None:
    """Load the best validation epoch's weights when a later epoch ended the run, and write
    them as the final checkpoint (the newest, so score and eval pick it)."""
    h, epochs = st.history, st.history.get("epochs", [])
    if h.get("best_epoch") is None or not epochs or epochs[-1]["epoch"] == h["best_epoch"]:
        return
    best = Store(run.run_dir).child("checkpoints").url_of(h["best_checkpoint"])
    meta = st.load(best)
    st.noise = {k: meta[k] for k in ("noise_var", "noise_from") if k in meta} or st.noise
    h["restored_best"] = {"epoch": h["best_epoch"], "checkpoint": h["best_checkpoint"]}
    _checkpoint(run, st, mid_epoch=False, protect=_best(st))


def fit(run: Run) -> dict:
    """Train `run` to the end on this rank (all ranks call it); returns the summary."""
    with old_objects_frozen():
        return _fit(run)


def _fit(run: Run) -> dict:
    cfg = run.cfg
    t0 = time.perf_counter()
    st = _State(run)
    _restore(run, st)
    st.timings["build"] = time.perf_counter() - t0
    telemetry = Telemetry(
        run.run_dir, cfg, run.world, steps_per_epoch=st.steps_per_epoch,
        start=st.started_from or {}, show=run.show,
    )  # fmt: skip
    while st.position.epoch < cfg.train.epochs:
        if _epoch(run, st, telemetry):
            break
    t1 = time.perf_counter()
    _restore_best(run, st)
    st.timings["restore_best"] = time.perf_counter() - t1
    batches = run.feed.evaluate("test")
    test = st.trainer.evaluate(batches) if batches is not None else {}
    st.timings["test"] = time.perf_counter() - t1 - st.timings["restore_best"]
    st.timings["epochs"] = sum(e["seconds"] + e["valid_seconds"] for e in st.history["epochs"])
    summary = {
        "name": cfg.name,
        "model": cfg.model.name,
        "task": cfg.task,
        "world_size": run.world.size,
        "test": test,
        "epochs": st.history.get("epochs", []),
        "best_valid": st.history.get("best"),
        "best_epoch": st.history.get("best_epoch"),
        "restored_best": st.history.get("restored_best"),
        "restarts": st.history.get("restarts", []),
        "started_from": st.started_from,
        "num_rows": st.spec.num_rows,
        **(st.noise or {}),
        "timings": {**run.extra_summary.pop("timings", {}), **st.timings},
        **run.extra_summary,
    }
    if cfg.model.name == "rafm" and batches is not None:
        summary["test_low"] = st.trainer.evaluate(run.feed.evaluate("test"), low=True)
    return telemetry.finish(summary)
