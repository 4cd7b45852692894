"""`ravfm score` on a Ray cluster: a pool of actors (GPU actors when the cluster has GPUs) that
each load the checkpoint once and score whole parts (ravfm.scored.write_part)."""

from __future__ import annotations

import os
import time
from typing import Any

import pyarrow as pa
import torch

__all__ = ["score_on_ray"]


class _PartWriter:
    """Actor: scores whole parts into the output, one file per part, in row order."""

    def __init__(self, job: dict, device: str, threads: int = 1) -> None:
        # One actor per core: its Parquet decoding, Polars hashing and torch ops get that core's
        # one thread (set before Polars starts its pool in this process), not a pool per core.
        os.environ["POLARS_MAX_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        pa.set_cpu_count(threads)
        from ravfm.scorer import Scorer

        self.t_init = time.time()
        self.job = job
        self.scorer = Scorer(job["checkpoint"], tuple(job["keep"]), device, meta=job["meta"])

    def __call__(self, items: dict[str, Any]) -> dict[str, Any]:
        from ravfm.scored import write_part

        out: dict[str, list] = {"part": [], "rows": [], "bytes": [], "sha256": [], "t_init": []}
        for path, groups, part in zip(items["path"], items["groups"], items["part"]):
            item = {"path": str(path), "groups": [int(g) for g in groups], "part": str(part)}
            w = write_part(self.scorer, item, self.job["output"], self.job["columns"],
                           self.job["batch_size"])  # fmt: skip
            for k in ("part", "rows"):
                out[k].append(w[k])
            out["bytes"].append(w.get("bytes", 0))
            out["sha256"].append(w.get("sha256", ""))
            out["t_init"].append(self.t_init)
        return out


def _pool(num_actors: int, num_parts: int) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) sized from the cluster unless given."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if gpus:
        return max(1, min(num_actors or gpus, num_parts)), 1.0, 1.0
    # Each actor reads, hashes, predicts and writes on one core. Their logical CPUs leave one
    # CPU free for Ray Data's own tasks, or on a small machine the pipeline never starts.
    n = max(1, min(num_actors or int(cpus), num_parts))
    return n, max(0.05, min(1.0, (cpus - 1.0) / n)), 0.0


def score_on_ray(
    items: list[dict], job: dict, address: str | None, num_actors: int
) -> tuple[list[dict], float, int]:
    """(the parts written, when the first actor began loading, actors)."""
    import ray

    from ravfm.connect import init_ray
    from ravfm.train.launch import user_error_in
    from ravfm.train.worker import quiet_data_context

    init_ray(address)
    quiet_data_context()
    actors, cpus, gpus = _pool(num_actors, len(items))
    try:
        done = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(
                _PartWriter,
                fn_constructor_kwargs={
                    "job": job,
                    "device": "cuda" if gpus else "cpu",
                    "threads": max(1, int(cpus)),
                },  # fmt: skip
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=cpus,
                num_gpus=gpus,
            )
            .take_all()
        )
    except Exception as e:  # noqa: BLE001 - an actor's user error comes back as its one line
        found = user_error_in(e)
        if found is not None:
            raise found from None
        raise
    t_first = min(float(d["t_init"]) for d in done) if done else time.time()
    written = [{k: d[k] for k in ("part", "rows", "bytes", "sha256")} for d in done]
    for w in written:
        w["rows"] = int(w["rows"])
        w["bytes"] = int(w["bytes"])
        w["part"] = str(w["part"])
        w["sha256"] = str(w["sha256"])
    return written, t_first, actors
