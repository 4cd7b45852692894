"""One worker on this machine: the epoch loop in this process, with no Ray at all.

Rows are read and hashed by a thread pool of this process and trained by torch's threads on
the same cores, in turns (ravfm.features.stream.thread_blocks). The batches are the ones a
one-worker Ray Train run makes, so the model, metrics and checkpoints are the same (tested).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ravfm.distributed.world import World
from ravfm.features.spec import FeatureSpec
from ravfm.features.stream import RowGroup
from ravfm.train.feed import Feed, local_blocks
from ravfm.train.loop import Run, fit, noise_holdout
from ravfm.train.step import evaluate_model
from ravfm.train.telemetry import ProgressPrinter

__all__ = ["train_local", "evaluate_local", "local_device"]


def local_device(use_gpu: bool) -> torch.device:
    from ravfm.errors import UserError

    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("train.use_gpu=true but torch sees no CUDA device; set train.use_gpu=false")
    return torch.device("cuda", 0)


def train_local(job: dict[str, Any], where: str) -> dict:
    """Run the epoch loop here. job: the driver's {"cfg", "spec_dir", "run_dir", "groups",
    "n_train", "resume", "init", "reset_optimizer"}."""
    cfg, threads = job["cfg"], job["threads"]
    print(
        f"ravfm: training {where}; one worker on this machine: in this process with "
        f"{threads} thread(s), no Ray (train.engine=ray or --address for Ray Train)",
        file=sys.stderr,
        flush=True,
    )
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    spec = FeatureSpec.load(job["spec_dir"])
    world = World.single(local_device(cfg.train.use_gpu))
    feed = Feed(
        job["groups"], world, local_blocks(spec, threads),
        batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
        shuffle_rows=cfg.train.shuffle_buffer, seed=cfg.seed,
        holdout=noise_holdout(cfg, any(g.rows for g in job["groups"].get("valid", []))),
    )  # fmt: skip
    printer = ProgressPrinter()
    run = Run(
        cfg=cfg,
        spec_dir=job["spec_dir"],
        run_dir=job["run_dir"],
        world=world,
        feed=feed,
        n_train=job["n_train"],
        resume=job["resume"],
        init=job["init"],
        reset_optimizer=job["reset_optimizer"],
        show=printer,
        extra_summary={"engine": "local", "threads": threads, "timings": job["timings"]},
    )
    try:
        return fit(run)
    finally:
        printer.close()


def evaluate_local(
    model: Any, spec: FeatureSpec, groups: list[RowGroup], task: str, threads: int
) -> dict:
    """Metrics of `model` on the rows of `groups`, read and hashed by `threads` threads."""
    world = World.single(next(model.parameters()).device)
    feed = Feed({"eval": groups}, world, local_blocks(spec, threads), batch_size=65536,
                eval_batch_size=65536, shuffle_rows=0, seed=0)  # fmt: skip
    return evaluate_model(model, feed.evaluate("eval") or [], task, world, spec.num_fields)
