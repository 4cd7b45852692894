"""The driver: prepare data, start Ray Train workers, print progress, write the run summary.

`train(cfg)`: raw data (or synthetic) -> shards -> feature stats -> TorchTrainer over Ray Data
streams -> summary.json with the test metrics. `evaluate(checkpoint)`: metrics of a checkpoint
on a split. Ray is started in-process unless an address (or RAY_ADDRESS) names a cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ravfm.config import RunConfig, to_dict
from ravfm.data.index import read_index, split_paths
from ravfm.errors import UserError

__all__ = ["train", "evaluate", "prepare_data", "plan_workers", "init_ray"]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_data(cfg: RunConfig) -> tuple[Path, Path, dict]:
    """Shards and feature spec for `cfg`, converting (or synthesising) and counting if needed."""
    from ravfm.data.convert import convert
    from ravfm.features.stats import run_stats

    shards = Path(cfg.shards_dir)
    source = cfg.data.source
    if source is None and not (shards / "_index.json").exists():
        from ravfm.data.synth import synth

        if cfg.data.dataset == "libsvm":
            raise UserError("data.source is required for libsvm data (a path or URL of the file)")
        _say(
            f"ravfm: no data source given: using SYNTHETIC {cfg.data.dataset}-shaped data "
            f"({cfg.data.synth_rows:,} rows, seed {cfg.seed}); pass data.source=PATH_OR_URL for real data"
        )
        raw = shards.parent / f"{shards.name}-synthetic-raw"
        source = str(synth(cfg.data.dataset, cfg.data.synth_rows, str(raw), seed=cfg.seed))
    elif source is None:
        _say(f"ravfm: using the existing shards in {shards} (no data.source given)")
    if source is not None:
        convert(
            cfg.data.dataset,
            source,
            str(shards),
            rows_per_shard=cfg.data.rows_per_shard,
            split=cfg.data.split,
            split_ratios=tuple(cfg.data.split_ratios),
            seed=cfg.seed,
            max_reject_rate=cfg.data.max_reject_rate,
            variant=cfg.data.variant,
        )
    index = read_index(shards)
    key = hashlib.sha256(json.dumps(to_dict(cfg.features), sort_keys=True).encode()).hexdigest()[
        :12
    ]
    spec_dir = shards / "_features" / key
    if not (spec_dir / "feature_spec.json").exists():
        run_stats(str(shards), str(spec_dir), cfg.features)
    return shards, spec_dir, index


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    verbose = os.environ.get("RAVFM_VERBOSE", "") not in ("", "0")
    env = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    try:
        ray.init(
            address=address,
            include_dashboard=False if address is None else None,
            log_to_driver=verbose,
            logging_level="ERROR",
            runtime_env=env,
        )
    except ConnectionError as e:
        raise UserError(
            f"cannot reach the Ray cluster at {address}: {e}; start it with "
            "`ray start --head` or drop --address to run locally"
        ) from None


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
    # torch threads = the worker's own CPUs, never more: Ray Data's tasks run on the others,
    # and an intra-op thread pool that shares a core with them stalls at every barrier
    # (measured: FM k=16 on 2 CPUs, 2 threads beside one busy process 24k samples/s, 1 thread
    # 177k).
    threads = max(1, int(per))
    return {
        "num_workers": workers,
        "cpus_per_worker": per,
        "threads": threads,
        "use_gpu": cfg.train.use_gpu,
    }


class _Progress(threading.Thread):
    """Prints one updating line from progress.json while workers train."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.stop_event = path, threading.Event()
        self.tty = sys.stderr.isatty()

    def run(self) -> None:
        last_line, last_print = "", 0.0
        while not self.stop_event.wait(1.0):
            try:
                p = json.loads(self.path.read_text())
            except (OSError, ValueError):
                continue
            done = p.get("epoch_done")
            m = (done or {}).get("valid") or p.get("train_rank0") or {}
            where = "valid" if done else "train"
            frac = 1.0 if done else min(1.0, p.get("epoch_step", 0) / max(1, p["steps_per_epoch"]))
            line = (
                f"epoch {p['epoch'] + 1}/{p['epochs']} step {p['step']:,} "
                f"({100 * frac:3.0f}% of epoch) {p['samples_per_s']:,.0f} samples/s {where} "
                + " ".join(
                    f"{k} {m[k]:.4f}"
                    for k in ("logloss", "auc", "rmse")
                    if isinstance(m.get(k), float)
                )
            )
            if self.tty:
                sys.stderr.write("\r" + line[:150].ljust(150))
                sys.stderr.flush()
            elif line != last_line and time.time() - last_print > 30:
                _say(line)
                last_print = time.time()
            last_line = line
        if self.tty:
            sys.stderr.write("\n")

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


def train(cfg: RunConfig, *, address: str | None = None, resume: str | None = None) -> dict:
    """Train `cfg` end to end; returns the summary (also in runs/NAME/summary.json)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ravfm.features.spec import FeatureSpec
    from ravfm.ingest import hashed_dataset, quiet_data_context
    from ravfm.train.worker import train_fn

    if resume is not None and not Path(resume).exists():
        raise UserError(
            f"--resume {resume} does not exist; pass runs/NAME/checkpoints or a step-* dir"
        )
    ckpts = Path(cfg.run_dir) / "checkpoints"
    if resume is None and any(ckpts.glob("step-*")):
        raise UserError(
            f"{cfg.run_dir} already holds checkpoints; pass --resume {ckpts} to continue "
            "that run, or choose another name=... (or delete the directory)"
        )
    shards, spec_dir, index = prepare_data(cfg)
    spec = FeatureSpec.load(spec_dir)
    if resume is not None:
        _check_resume(resume, cfg, spec)
    init_ray(address)
    quiet_data_context()
    plan = plan_workers(cfg, ray.cluster_resources())
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    n_train = int(index["splits"]["train"]["rows"])
    paths = {split: split_paths(shards, split) for split in ("train", "valid", "test")}
    if not paths["train"]:
        raise UserError(f"{shards} has no train rows; check data.split and the source")
    datasets = {  # a standard split (MovieLens u1..u5) has no valid part: it is simply absent
        split: hashed_dataset(p, spec, shuffle_seed=cfg.seed if split == "train" else None)
        for split, p in paths.items()
        if p
    }
    _say(
        f"ravfm: training {cfg.model.name} on {cfg.data.dataset} ({n_train:,} train rows, "
        f"{spec.num_fields} fields, {spec.num_rows:,} table rows) with {plan['num_workers']} "
        f"worker(s) x {plan['cpus_per_worker']:g} CPU, embedding {cfg.embedding.sharding}; run dir {run_dir}"
    )
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={
            "cfg": to_dict(cfg),
            "spec_dir": str(spec_dir.resolve()),
            "run_dir": str(run_dir),
            "resume": resume,
            "threads": plan["threads"],
            "n_train": n_train,
            "splits": sorted(datasets),
            "invocation": uuid.uuid4().hex,
            "fault": {k: v for k, v in os.environ.items() if k.startswith("RAVFM_FAULT_")},
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan["num_workers"],
            use_gpu=plan["use_gpu"],
            resources_per_worker={"CPU": plan["cpus_per_worker"]},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=str(run_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets=datasets,
    )
    progress = _Progress(run_dir / "progress.json")
    progress.start()
    t0 = time.time()
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; surface the root cause
        progress.stop()
        root = e.__cause__ or e
        if isinstance(root, UserError):
            raise UserError(str(root)) from None
        raise
    progress.stop()
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_seconds"] = time.time() - t0
    _print_summary(summary)
    return summary


def _check_resume(resume: str, cfg: RunConfig, spec: Any) -> None:
    from ravfm.features.spec import FeatureSpec
    from ravfm.storage import Store
    from ravfm.train.checkpoint import read_manifest

    meta = read_manifest(resume)
    FeatureSpec.load(Store(meta["path"]).url_of("spec")).check_compatible(spec)
    saved = meta["config"]["model"]
    for key in ("name", "k", "task"):
        if saved.get(key) != getattr(cfg.model, key):
            raise UserError(
                f"checkpoint {meta['path']} has model.{key}={saved.get(key)!r} but this "
                f"run has {getattr(cfg.model, key)!r}; resume with the same model settings"
            )


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
        if key in summary:
            m = summary[key]
            rows.append(("final", key, *(_fmt(m.get(k)) for k in ("logloss", "auc", "rmse")), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.5f}"


def evaluate(
    checkpoint: str, *, split: str = "test", shards: str | None = None, address: str | None = None
) -> dict:
    """Metrics of `checkpoint` on `split`, computed in this process over a Ray Data stream."""
    import torch

    from ravfm.batch import from_numpy
    from ravfm.ingest import hashed_dataset, quiet_data_context
    from ravfm.metrics import MetricState
    from ravfm.train.checkpoint import load_model

    model, spec, meta = load_model(checkpoint)
    shards = (
        shards or meta["config"]["data"]["shards"] or str(Path("data") / meta["config"]["name"])
    )
    init_ray(address)
    quiet_data_context()
    ds = hashed_dataset(split_paths(shards, split), spec)
    state = MetricState(meta["task"])
    with torch.no_grad():
        for arrays in ds.iter_batches(batch_size=65536, batch_format="numpy"):
            b = from_numpy(arrays)
            state.update(model.predict(b.ids, b.values).float(), b.label, meta["task"])
    metrics = state.compute()
    print(json.dumps({"checkpoint": meta["path"], "split": split, **metrics}, default=float))
    return metrics
