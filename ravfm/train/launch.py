"""Training on Ray Train: size the workers, start them on `train_fn`, follow their progress, and
bring a worker's user error back as the same one line it would be before Ray started."""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any

from ravfm.config import to_dict
from ravfm.connect import init_ray
from ravfm.errors import UserError
from ravfm.storage import Store
from ravfm.train.telemetry import ProgressPrinter, progress_line

__all__ = ["train_on_ray", "user_error_in"]


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError a Ray worker, task or actor raised, found inside Ray's wrappers
    (RayTaskError, WorkerGroupError, TrainingFailedError...), or None."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return UserError(str(e).splitlines()[0])
        cause = getattr(e, "cause", None)
        as_instance = getattr(e, "as_instanceof_cause", None)
        if callable(as_instance):
            try:
                todo.append(as_instance())
            except Exception:  # noqa: BLE001 - a wrapper that cannot be unwrapped
                pass
        todo += [e.__cause__, e.__context__, cause]
        for attr in ("worker_failures", "errors", "exceptions"):
            inner = getattr(e, attr, None)
            if isinstance(inner, dict):
                todo += list(inner.values())
            elif isinstance(inner, (list, tuple)):
                todo += list(inner)
    text = str(exc)
    marker = "ravfm.errors.UserError: "
    if marker in text:  # a traceback rendered to text: its last UserError line
        return UserError(text[text.rindex(marker) + len(marker) :].splitlines()[0])
    return None


class _Follow(threading.Thread):
    """Prints the progress line from the run's progress.json while workers train."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(daemon=True)
        self.store, self.stop_event, self.printer = (
            Store(run_dir),
            threading.Event(),
            ProgressPrinter(),
        )

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            try:
                self.printer(progress_line(self.store.read_json("progress.json")))
            except (OSError, ValueError, KeyError):
                continue

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        self.printer.close()


def train_on_ray(
    job: dict[str, Any], where: str, address: str | None, plan_workers: Callable
) -> dict:
    """Run ravfm.train.worker.train_fn on Ray Train workers; returns rank 0's summary."""
    import json
    import os

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from ravfm.train.worker import train_fn

    cfg = job["cfg"]
    init_ray(address)
    plan = plan_workers(cfg, ray.cluster_resources())
    print(
        f"ravfm: training {where} on Ray Train: {plan['num_workers']} worker(s) x "
        f"{plan['cpus_per_worker']:g} CPU, embedding {cfg.embedding.sharding}",
        file=sys.stderr,
        flush=True,
    )
    config = {
        "cfg": to_dict(cfg),
        "spec_dir": job["spec_dir"],
        "run_dir": job["run_dir"],
        "resume": job["resume"],
        "init": job["init"],
        "reset_optimizer": job["reset_optimizer"],
        "threads": plan["threads"],
        "ingest_cpus": plan["ingest_cpus"],
        "n_train": job["n_train"],
        "groups": {s: [[g.path, g.group, g.rows] for g in gs] for s, gs in job["groups"].items()},
        "invocation": uuid.uuid4().hex,
        "fault": {k: v for k, v in os.environ.items() if k.startswith("RAVFM_FAULT_")},
    }
    run_store = Store(job["run_dir"])
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan["num_workers"],
            use_gpu=plan["use_gpu"],
            resources_per_worker={"CPU": plan["cpus_per_worker"]},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=_ray_storage(run_store),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
    follow = _Follow(job["run_dir"])
    follow.start()
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; surface the user's line
        found = user_error_in(e)
        if found is not None:
            raise found from None
        raise
    finally:
        follow.stop()
    return {**json.loads(run_store.read_bytes("summary.json")), "engine": "ray", **plan}


def _waiting_for() -> str:
    """What the cluster has free, in one line (for a run that does not move)."""
    import ray

    free = ray.available_resources()
    total = ray.cluster_resources()
    cpu = f"{free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPUs free"
    return (
        f"the cluster has {cpu}; if tasks wait for CPUs, lower train.num_workers or "
        "train.cpus_per_worker (Ray Data reads and hashes on the CPUs the workers leave)"
    )


def _ray_storage(run_store: Store) -> str:
    """Ray Train's own bookkeeping beside the run (a local path, or the run's storage URL)."""
    return run_store.url_of("ray")
