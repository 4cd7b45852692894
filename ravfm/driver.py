"""The driver: prepare data, run the epoch loop in this process or on Ray Train, report.

`train(cfg)`: raw data (or synthetic) -> shards -> feature stats -> every shard checked against
its index -> ravfm.train.loop.fit, either here (one worker on this machine: no Ray at all) or in
Ray Train workers (a cluster, or several workers) -> summary.json with the test metrics. Both
paths run the same loop over the same batches, so they give the same model. `evaluate`: the
metrics of a checkpoint on a split, in this process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from typing import Any

from ravfm.config import RunConfig, to_dict
from ravfm.connect import ray_address
from ravfm.data.index import read_index
from ravfm.errors import UserError
from ravfm.storage import Store, is_url

__all__ = ["train", "evaluate", "prepare_data", "plan_workers", "with_task", "local_threads"]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_data(cfg: RunConfig) -> tuple[str, str, dict]:
    """(shards, feature spec directory, index) for `cfg`, converting (or synthesising) and
    counting when needed. Either may be a local path or a storage URL."""
    from ravfm.data.convert import convert
    from ravfm.features.spec import FORMAT_VERSION
    from ravfm.features.stats import run_stats

    shards = Store(cfg.shards_dir)
    source = cfg.data.source
    if source is None and not shards.exists("_index.json"):
        from ravfm.data.synth import synth

        if cfg.data.dataset == "libsvm":
            raise UserError("data.source is required for libsvm data (a path or URL of the file)")
        if not shards.local:
            raise UserError(
                f"data.shards={cfg.shards_dir} holds no _index.json; convert the data there "
                "first (`ravfm convert ... --out URL`) or pass data.source"
            )
        _say(
            f"ravfm: no data source given: using SYNTHETIC {cfg.data.dataset}-shaped data "
            f"({cfg.data.synth_rows:,} rows, seed {cfg.seed}); pass data.source=PATH_OR_URL for real data"
        )
        raw = f"{shards.url}-synthetic-raw"
        source = str(synth(cfg.data.dataset, cfg.data.synth_rows, raw, seed=cfg.seed))
    elif source is None:
        _say(f"ravfm: using the existing shards in {shards.url} (no data.source given)")
    if source is not None:
        convert(
            cfg.data.dataset,
            source,
            shards.url,
            rows_per_shard=cfg.data.rows_per_shard,
            split=cfg.data.split,
            split_ratios=tuple(cfg.data.split_ratios),
            seed=cfg.seed,
            max_reject_rate=cfg.data.max_reject_rate,
            variant=cfg.data.variant,
        )
    index = read_index(shards.url)
    blob = json.dumps({"spec": FORMAT_VERSION, **to_dict(cfg.features)}, sort_keys=True)
    spec_dir = shards.child("_features").url_of(hashlib.sha256(blob.encode()).hexdigest()[:12])
    if not Store(spec_dir).exists("feature_spec.json"):
        run_stats(shards.url, spec_dir, cfg.features)
    return shards.url, spec_dir, index


def with_task(cfg: RunConfig, spec: Any) -> RunConfig:
    """cfg with model.task set from the feature spec, which knows the labels (ratings or
    clicks); a config that names the other task is refused."""
    if cfg.model.task not in ("auto", spec.task):
        raise UserError(
            f"model.task={cfg.model.task} but the {spec.dataset} data holds "
            f"{'ratings' if spec.task == 'regression' else 'click labels'} (task {spec.task}, "
            "found by `ravfm stats`); drop model.task or pass data of that kind"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, task=spec.task))


def local_threads(cfg: RunConfig) -> int:
    """Threads of a one-process run: train.cpus_per_worker, else every CPU this process may use."""
    from ravfm.settings import local_cpus

    if cfg.train.cpus_per_worker:
        return max(1, int(cfg.train.cpus_per_worker))
    return local_cpus()


def plan_workers(cfg: RunConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """Worker count, CPUs per worker and torch threads sized from the cluster, leaving about
    half of the CPUs to Ray Data's hashing tasks (two 1-CPU workers on 2 CPUs starve ingest)."""
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    if cfg.train.use_gpu and gpus < 1:
        raise UserError(
            "train.use_gpu=true but the Ray cluster has no GPU; set train.use_gpu=false"
        )
    workers = cfg.train.num_workers or (int(gpus) if cfg.train.use_gpu else max(1, int(cpus // 4)))
    per = cfg.train.cpus_per_worker or max(0.25, min(8.0, cpus / (2 * workers)))
    if workers * per > cpus:
        raise UserError(
            f"train.num_workers={workers} x {per} CPUs exceeds the cluster's {cpus:g} "
            "CPUs; lower train.num_workers or train.cpus_per_worker"
        )
    if not cfg.train.use_gpu and cpus - workers * per < 0.25:
        raise UserError(
            f"train.num_workers={workers} x {per:g} CPUs takes all {cpus:g} CPUs of the cluster "
            "and leaves none to Ray Data's reading and hashing (the run would wait forever); "
            "lower train.cpus_per_worker or train.num_workers"
        )
    # torch threads = the worker's own CPUs, never more: Ray Data's tasks run on the others,
    # and an intra-op thread pool that shares a core with them stalls at every barrier
    # (measured: FM k=16 on 2 CPUs, 2 threads beside one busy process 24k samples/s, 1 thread
    # 177k).
    threads = max(1, int(per))
    # Each read-and-hash task asks what the workers leave (at most 1 CPU), so the tasks always
    # fit beside the workers: with 1 CPU each, 3 x 0.5-CPU workers on 2 CPUs waited forever.
    ingest = round(min(1.0, max(0.25, cpus - workers * per) if not cfg.train.use_gpu else 1.0), 3)
    return {"num_workers": workers, "cpus_per_worker": per, "threads": threads,
            "use_gpu": cfg.train.use_gpu, "ingest_cpus": ingest}  # fmt: skip


def _engine(cfg: RunConfig, address: str | None) -> str:
    """local (this process, no Ray) or ray."""
    if cfg.train.engine != "auto":
        return cfg.train.engine
    if ray_address(address) is not None:
        return "ray"
    workers = cfg.train.num_workers or (1 if cfg.train.use_gpu else max(1, local_threads(cfg) // 4))
    return "local" if workers == 1 else "ray"


def _check_start(cfg: RunConfig, resume: str | None, init: str | None) -> None:
    """Before any work: where the run goes, and that what it starts from exists."""
    for url in (cfg.runs_dir, cfg.data.shards):
        if url and is_url(url) and not url.startswith("file://"):
            Store(url)  # a storage URL whose backend is missing is one line, not a traceback
    if resume is not None and init is not None:
        raise UserError(
            "pass either --resume (continue a run) or --init-from (a new run), not both"
        )
    for flag, path in (("--resume", resume), ("--init-from", init)):
        if path is not None and not Store(path).exists():
            raise UserError(
                f"{flag} {path} does not exist; pass runs/NAME/checkpoints or a step-* dir"
            )
    ckpts = Store(cfg.run_dir).child("checkpoints")
    if resume is None and any(n.startswith("step-") for n in ckpts.list()):
        raise UserError(
            f"{cfg.run_dir} already holds checkpoints; pass --resume {ckpts.url} to continue "
            "that run, or choose another name=... (or delete the directory)"
        )


def train(
    cfg: RunConfig,
    *,
    address: str | None = None,
    resume: str | None = None,
    init: str | None = None,
    reset_optimizer: bool = False,
) -> dict:
    """Train `cfg` end to end; returns the summary (also in RUN_DIR/summary.json)."""
    from ravfm.features.spec import FeatureSpec
    from ravfm.features.stream import split_groups
    from ravfm.settings import process_age
    from ravfm.train.start import check_start_checkpoint

    t0 = time.time()
    timings = {"startup": process_age()}  # interpreter and imports, when run as a command
    _check_start(cfg, resume, init)
    shards, spec_dir, index = prepare_data(cfg)
    timings["data"] = time.time() - t0
    spec = FeatureSpec.load(spec_dir)
    cfg = with_task(cfg, spec)
    for path in (resume, init):
        if path is not None:
            check_start_checkpoint(path, cfg, spec, warm=path is init)
    groups = {s: split_groups(shards, index, s, spec) for s in ("train", "valid", "test")}
    n_train = sum(g.rows for g in groups["train"])
    if not n_train:
        raise UserError(f"{shards} has no train rows; check data.split and the source")
    run_dir = Store(cfg.run_dir)
    run_dir.write_json("config.json", to_dict(cfg))
    timings["checks"] = time.time() - t0 - timings["data"]
    job = {"cfg": cfg, "spec_dir": spec_dir, "run_dir": run_dir.url, "groups": groups,
           "n_train": n_train, "resume": resume, "init": init, "reset_optimizer": reset_optimizer,
           "threads": local_threads(cfg), "timings": timings}  # fmt: skip
    where = (
        f"{cfg.model.name} on {cfg.data.dataset} ({n_train:,} train rows, {spec.num_fields} "
        f"fields, {spec.num_rows:,} table rows); run dir {run_dir.url}"
    )
    if _engine(cfg, address) == "local":
        from ravfm.train.local import train_local

        summary = train_local(job, where)
    else:
        from ravfm.train.launch import train_on_ray

        summary = train_on_ray(job, where, address, plan_workers)
    summary["wall_seconds"] = time.time() - t0
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    rows = [("epoch", "split", "logloss", "auc", "rmse", "samples/s")]
    for e in summary.get("epochs", []):
        sps = e["train"].get("n", 0) / max(e.get("seconds", 1e-9), 1e-9)
        for split in ("train", "valid"):
            m = e[split]
            if not m:
                continue
            rows.append(
                (
                    str(e["epoch"] + 1),
                    split,
                    *(_fmt(m.get(k)) for k in ("logloss", "auc", "rmse")),
                    f"{sps:,.0f}" if split == "train" else "",
                )
            )
    for key in ("test", "test_low"):
        if summary.get(key):
            m = summary[key]
            rows.append(("final", key, *(_fmt(m.get(k)) for k in ("logloss", "auc", "rmse")), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    best = summary.get("restored_best")
    if best:
        print(
            f"test metrics and the final checkpoint are from epoch {best['epoch'] + 1}, the best on valid"
        )


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.5f}"


def evaluate(checkpoint: str, *, split: str = "test", shards: str | None = None) -> dict:
    """Metrics of `checkpoint` on `split` of its shards (or `shards`), in this process."""
    from ravfm.features.stream import split_groups
    from ravfm.storage import dumps
    from ravfm.train.checkpoint import load_model
    from ravfm.train.local import evaluate_local

    model, spec, meta = load_model(checkpoint)
    cfg = meta["config"]
    shards = shards or cfg["data"]["shards"] or f"data/{cfg['name']}"
    index = read_index(shards)
    if split not in index["splits"]:
        raise UserError(f"{shards}: no split {split!r}; choose one of {', '.join(index['splits'])}")
    groups = split_groups(shards, index, split, spec)
    metrics = evaluate_local(model, spec, groups, meta["task"], local_threads(RunConfig()))
    print(dumps({"checkpoint": meta["path"], "split": split, **metrics}, indent=None))
    return metrics
