"""The Ray Train worker function: ravfm.train.loop.fit with the Ray touchpoints numbered.

Ray touchpoints: (1) the world from Ray Train's process group, (2) Ray Data reading and hashing
this rank's row groups, (3) `ray.train.report` at the end. Everything else is ravfm.train.loop,
which runs without Ray. Only rank 0 writes logs, metrics and the summary; every rank joins every
collective and writes its own embedding rows into each checkpoint.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch

from ravfm.config import RunConfig, from_dict
from ravfm.distributed.world import World
from ravfm.features.spec import FeatureSpec
from ravfm.features.stream import Block, RowGroup, read_group
from ravfm.storage import Store, dumps
from ravfm.train.feed import Blocks, Feed
from ravfm.train.loop import Run, fit, noise_holdout
from ravfm.train.step import Position

__all__ = ["train_fn", "ray_blocks", "quiet_data_context"]


def quiet_data_context() -> None:
    """No per-dataset progress bars or banners; blocks come out in input order."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # the same batches as one process would make
    for attr in ("print_on_execution_start", "enable_operator_progress_bars"):
        if hasattr(ctx, attr):
            setattr(ctx, attr, False)


def _read(items: dict[str, Any], spec: FeatureSpec) -> Iterator[Block]:
    """map_batches: row groups {"path", "group", "rows"} -> their hashed blocks."""
    for path, group, rows in zip(items["path"], items["group"], items["rows"]):
        yield read_group(RowGroup(str(path), int(group), int(rows)), spec)


def ray_blocks(spec: FeatureSpec, task_cpus: float = 1.0) -> Blocks:
    """An executor that reads and hashes row groups in Ray Data tasks (anywhere in the
    cluster), one task per row group asking `task_cpus` CPUs, yielding the blocks in input
    order."""
    import ray.data

    def blocks(groups: list[RowGroup]) -> Iterator[Block]:
        if not groups:
            return
        quiet_data_context()
        ds = ray.data.from_items(
            [{"path": g.path, "group": g.group, "rows": g.rows} for g in groups],
            override_num_blocks=len(groups),
        ).map_batches(
            _read, batch_format="numpy", batch_size=1, fn_kwargs={"spec": spec}, num_cpus=task_cpus
        )
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)

    return blocks


def train_fn(config: dict) -> None:
    """Train one rank. config: {"cfg": resolved RunConfig dict, "spec_dir", "run_dir",
    "resume", "init", "reset_optimizer", "threads", "n_train", "groups": {split: [[path,
    group, rows], ...]}, "invocation", "fault"}."""
    cfg: RunConfig = from_dict(RunConfig, config["cfg"])
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    torch.manual_seed(cfg.seed)
    world = World.from_env(ray.train.torch.get_device())  # (1) the process group Ray Train made
    spec = FeatureSpec.load(config["spec_dir"])
    groups = {s: [RowGroup(*g) for g in gs] for s, gs in config["groups"].items()}
    feed = Feed(
        groups, world, ray_blocks(spec, config.get("ingest_cpus", 1.0)),  # (2) Ray Data reads and hashes this rank's rows
        batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
        shuffle_rows=cfg.train.shuffle_buffer, seed=cfg.seed,
        holdout=noise_holdout(cfg, any(g.rows for g in groups.get("valid", []))),
    )  # fmt: skip
    run_store = Store(config["run_dir"])
    invocation = config.get("invocation", "")

    def on_restore(meta: dict, history: dict) -> None:
        if world.rank == 0 and run_store.exists(f".started-{invocation}"):
            history.setdefault("restarts", []).append(_restart_record(run_store, meta, cfg, world))

    run = Run(
        cfg=cfg,
        spec_dir=config["spec_dir"],
        run_dir=config["run_dir"],
        world=world,
        feed=feed,
        n_train=config["n_train"],
        resume=config.get("resume"),
        init=config.get("init"),
        reset_optimizer=bool(config.get("reset_optimizer")),
        on_step=_fault_hook(config.get("fault") or {}, world.rank),
        on_restore=on_restore,
    )
    if world.rank == 0:
        run_store.write_bytes(f".started-{invocation}", b"")
    summary = fit(run)
    ray.train.report({"summary": dumps(summary)})  # (3) back to the driver


def _restart_record(store: Store, meta: dict, cfg: RunConfig, world: World) -> dict:
    """After a failure: how many samples may be trained twice (those after the checkpoint)."""
    last = meta["position"]["step"]
    try:
        last = max(last, store.read_json("progress.json")["step"])
    except (OSError, ValueError, KeyError):
        pass
    steps = last - meta["position"]["step"]
    bound = max(steps, cfg.train.checkpoint_every or 0) * cfg.train.batch_size * world.size
    return {
        "from_step": meta["position"]["step"],
        "last_logged_step": last,
        "repeated_samples_at_most": bound,
    }


def _fault_hook(fault: dict, rank: int):
    """Fault injection for the kill-a-worker test: the driver's RAVFM_FAULT_KILL_STEP=S[:RANK]
    SIGKILLs that rank's process at step S, once (RAVFM_FAULT_MARKER names the file that
    records it happened)."""
    spec, marker = fault.get("RAVFM_FAULT_KILL_STEP"), fault.get("RAVFM_FAULT_MARKER")
    if not spec or not marker:
        return None
    kill_step, _, kill_rank = spec.partition(":")

    def hook(pos: Position) -> None:
        if pos.step == int(kill_step) and rank == int(kill_rank or 0):
            if not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

    return hook
