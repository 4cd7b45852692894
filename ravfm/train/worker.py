"""The Ray Train worker function: plain PyTorch with the Ray touchpoints numbered.

Ray touchpoints: (1) the world from Ray Train's process group, (2) this rank's dataset shards,
(3) `ray.train.report` at the end. Everything else is ravfm.train.loop, which runs without Ray.
Only rank 0 writes logs, metrics and the summary; every rank joins every collective and writes
its own embedding rows into each checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch

from ravfm.batch import from_numpy
from ravfm.config import RunConfig, from_dict
from ravfm.distributed.optim import build_optimizers
from ravfm.distributed.world import World
from ravfm.train.checkpoint import latest_checkpoint, load_checkpoint, load_seen, save_checkpoint
from ravfm.train.loop import Position, Trainer, improved, merged
from ravfm.train.setup import build_for_training, early_stopping_metric
from ravfm.train.telemetry import Telemetry

__all__ = ["train_fn", "worker_batches"]


def worker_batches(
    shard: Any,
    batch_size: int,
    *,
    seed: int | None = None,
    shuffle_buffer: int = 0,
    skip: np.ndarray | None = None,
):
    """Batches of this rank's dataset shard as Batch tensors, with no per-row Python.
    Rows whose row number is in `skip` (already trained before a restart) are dropped."""
    kwargs = {}
    if shuffle_buffer and seed is not None:
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed}
    for arrays in shard.iter_batches(batch_size=batch_size, batch_format="numpy", **kwargs):
        if skip is not None and skip.size and "row" in arrays:
            keep = ~np.isin(arrays["row"], skip, assume_unique=False)
            if not keep.all():
                arrays = {k: v[keep] for k, v in arrays.items()}
        yield from_numpy(arrays)


def train_fn(config: dict) -> None:
    """Train one rank. config: {"cfg": resolved RunConfig dict, "spec_dir", "run_dir",
    "resume": checkpoint dir or None, "threads", "n_train"}."""
    cfg: RunConfig = from_dict(RunConfig, config["cfg"])
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    torch.manual_seed(cfg.seed)
    world = World.from_env(ray.train.torch.get_device())  # (1) the process group Ray Train made
    run_dir = Path(config["run_dir"])
    ckpt_root = run_dir / "checkpoints"

    model, spec = build_for_training(cfg, config["spec_dir"], world, n_train=config["n_train"])
    sparse_opt, dense_opt = build_optimizers(model, cfg.optim)
    steps_per_epoch = max(1, config["n_train"] // (cfg.train.batch_size * world.size))
    trainer = Trainer(
        model,
        sparse_opt,
        dense_opt,
        world,
        task=cfg.task,
        optim=cfg.optim,
        num_fields=spec.num_fields,
        bf16=cfg.train.bf16,
        total_steps=steps_per_epoch * cfg.train.epochs,
    )
    position, history, skip = Position(), {}, None

    start_from = latest_checkpoint(str(ckpt_root)) or (
        config.get("resume") and latest_checkpoint(config["resume"])
    )
    if start_from:
        meta = load_checkpoint(start_from, model=model, sparse_opt=sparse_opt, dense_opt=dense_opt)
        pos = meta["position"]
        position = Position(epoch=pos["epoch"], step=pos["step"])
        history = meta.get("history", {})
        if pos.get("mid_epoch"):
            skip = load_seen(meta)
            # The union of all ranks' seen rows: rank 0 carries it on (counted once).
            position.seen = [skip] if world.rank == 0 else []
            position.epoch_samples = int(skip.size) if world.rank == 0 else 0
        if world.rank == 0 and _is_restart(run_dir, config.get("invocation", "")):
            history.setdefault("restarts", []).append(_restart_record(run_dir, meta, cfg, world))
    if world.rank == 0:
        (run_dir / f".started-{config.get('invocation', '')}").touch()

    telemetry = Telemetry(
        run_dir,
        cfg,
        world,
        steps_per_epoch=steps_per_epoch,
        resumed_from=str(start_from) if start_from else None,
    )
    metric = early_stopping_metric(cfg)
    train_shard = ray.train.get_dataset_shard("train")  # (2) this rank's streamed shards
    splits = set(config.get("splits", ("train", "valid", "test")))
    valid_shard = ray.train.get_dataset_shard("valid") if "valid" in splits else None
    test_shard = ray.train.get_dataset_shard("test") if "test" in splits else None

    def evaluate(shard: Any, low: bool = False) -> dict:
        if shard is None:  # e.g. MovieLens u1..u5 have no valid split
            return {}
        return trainer.evaluate(worker_batches(shard, cfg.train.eval_batch_size), low=low)

    def checkpoint(mid_epoch: bool) -> None:
        manifest = {
            "epoch": position.epoch,
            "position": {"epoch": position.epoch, "step": position.step, "mid_epoch": mid_epoch},
            "config": config["cfg"],
            "task": cfg.task,
            "n_train": config["n_train"],
            "model": cfg.model.name,
            "history": history,
        }
        save_checkpoint(
            str(ckpt_root),
            position.step,
            model=model,
            sparse_opt=sparse_opt,
            dense_opt=dense_opt,
            world=world,
            manifest=manifest,
            spec_dir=str(config["spec_dir"]),
            seen=position.seen_rows() if mid_epoch else None,
            keep=cfg.train.keep_checkpoints,
        )

    def on_step(pos: Position, state: Any, seconds: float) -> bool:
        telemetry.step(pos, state, seconds)
        _maybe_inject_fault(config.get("fault") or {}, pos.step, world.rank)
        if cfg.train.checkpoint_every and pos.step % cfg.train.checkpoint_every == 0:
            checkpoint(mid_epoch=True)
        return bool(cfg.train.max_steps and pos.step >= cfg.train.max_steps)

    best, bad_epochs = history.get("best"), history.get("bad_epochs", 0)
    while position.epoch < cfg.train.epochs:
        t0 = time.perf_counter()
        batches = worker_batches(
            train_shard,
            cfg.train.batch_size,
            seed=cfg.seed + position.epoch,
            shuffle_buffer=cfg.train.shuffle_buffer,
            skip=skip,
        )
        state = trainer.fit_epoch(batches, position, on_step)
        train_metrics = merged(state, world).compute()
        seconds = time.perf_counter() - t0
        valid = evaluate(valid_shard)
        skip = None
        history.setdefault("epochs", []).append(
            {
                "epoch": position.epoch,
                "train": train_metrics,
                "valid": valid,
                "seconds": seconds,
                "first_batch_seconds": trainer.first_batch_seconds or 0.0,
                "seen": world_sum(world, len(position.seen_rows())),
            }
        )
        telemetry.epoch(position, train_metrics, valid, seconds)
        value = valid.get(metric)
        if value is not None and improved(metric, value, best):
            best, bad_epochs = value, 0
        elif value is not None:
            bad_epochs += 1
        history.update(best=best, bad_epochs=bad_epochs)
        stop = bool(cfg.train.max_steps and position.step >= cfg.train.max_steps) or bool(
            cfg.train.early_stopping_patience and bad_epochs >= cfg.train.early_stopping_patience
        )
        position.next_epoch()
        checkpoint(mid_epoch=False)
        if stop:
            break

    test = evaluate(test_shard)
    extra = {"test_low": evaluate(test_shard, low=True)} if cfg.model.name == "rafm" else {}
    summary = telemetry.finish(test, history, extra)
    ray.train.report({"summary": json.dumps(summary)})  # (3) back to the driver


def _is_restart(run_dir: Path, invocation: str) -> bool:
    """True when this driver invocation already started workers once (Ray Train restarted them)."""
    return (run_dir / f".started-{invocation}").exists()


def _restart_record(run_dir: Path, meta: dict, cfg: RunConfig, world: World) -> dict:
    """After a failure: how many samples may be trained twice (those after the checkpoint)."""
    last = meta["position"]["step"]
    try:
        last = max(last, json.loads((run_dir / "progress.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        pass
    steps = last - meta["position"]["step"]
    bound = max(steps, cfg.train.checkpoint_every or 0) * cfg.train.batch_size * world.size
    return {
        "from_step": meta["position"]["step"],
        "last_logged_step": last,
        "repeated_samples_at_most": bound,
    }


def _maybe_inject_fault(fault: dict, step: int, rank: int) -> None:
    """Fault injection for the kill-a-worker test: the driver's RAVFM_FAULT_KILL_STEP=S[:RANK]
    SIGKILLs that rank's process at step S, once (RAVFM_FAULT_MARKER names the file that
    records it happened)."""
    spec = fault.get("RAVFM_FAULT_KILL_STEP")
    marker = fault.get("RAVFM_FAULT_MARKER")
    if not spec or not marker:
        return
    kill_step, _, kill_rank = spec.partition(":")
    if step == int(kill_step) and rank == int(kill_rank or 0) and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


def world_sum(world: World, n: int) -> int:
    t = torch.tensor([float(n)], dtype=torch.float64)
    world.all_reduce_(t)
    return int(t.item())
