"""`make bench-e2e`: what a user runs, timed as a whole, beside xLearn, TorchRec and PyTorch.

    python -m bench.e2e [--rows 1000000] [--seeds 3] [--work /tmp/ravfm-e2e] [--skip-peers]

Data: `ravfm synth criteo --rows N` (a planted k=8 FM, Bayes AUC about 0.81), the first 90% of
its lines a train file and the last 10% a test file, each converted by `ravfm convert` (timed
and reported apart). What each timer covers:

- ravfm train: the whole `ravfm train --config jobs/criteo_fm.yaml` process with the job's
  defaults and train.epochs=1 (the peers train one epoch too), on the converted train shards,
  its feature-statistics pass included (the spec is deleted before every run). samples/s over
  the epoch is what the command prints; "steady" leaves out the wait for the first batch.
- ravfm score: the whole `ravfm score` process on the 100,000 test rows (and, apart, on
  `--score-rows` rows of another synthetic file), the output read back through read_scores.
- ravfm_bare_sps: ravfm's training step alone (bench/train_bare.py) on the same rows already
  hashed and held in memory, with the job's table (after min_count), optimizer and batch, on
  all cores: what the epoch would reach if reading, hashing and batching were free.
- peers: each runner's whole process (bench/peers/) on its own input prepared from ravfm's
  hashed ids of the same rows (xLearn's libSVM text, the torch peers' id arrays); preparing it
  is timed apart. Their optimizers differ from ravfm's by design (each peer's own: xLearn's
  per-row AdaGrad, TorchRec's fused row-wise Adagrad, PyTorch's SparseAdam); threads (2),
  k (16), epochs (1) and the test rows are the same. AUC and log loss of every system are
  computed here, from the written predictions, with one exact rank statistic.
- memory: the peak of the summed PSS of each command's process tree (bench/peers/procmem.py).

Results: bench/results/e2e.json (e2e-<rows>.json for other sizes) and BENCHMARKS.md, with met /
NOT MET against the end-to-end issue's targets (ratios measured in this run). `--real` adds the
real Criteo and Avazu samples of ../shared/data: each default job against xLearn on the same
split.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import write_result
from bench.peers.peer_io import binary_metrics
from bench.peers.procmem import run_measured

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
PEERS_PY = ROOT / ".peers-venv" / "bin" / "python"
JOB = ROOT / "jobs" / "criteo_fm.yaml"
PEERS = {"xlearn": "xlearn_fm.py", "torchrec": "torchrec_fm.py", "pytorch": "torch_sparse_fm.py"}


def _ravfm(*args: str) -> list[str]:
    return [sys.executable, "-m", "ravfm", *args]


def _check(res: dict, what: str) -> dict:
    if res["returncode"] != 0:
        tail = "\n".join(res["stderr"].strip().splitlines()[-5:])
        raise RuntimeError(f"{what} failed (exit {res['returncode']}):\n{tail}")
    return res


def _split_lines(raw: Path, train: Path, test: Path, test_share: float = 0.1) -> None:
    n = sum(1 for _ in open(raw, "rb"))
    cut = n - int(n * test_share)
    with open(raw, "rb") as src, open(train, "wb") as a, open(test, "wb") as b:
        for i, line in enumerate(src):
            (a if i < cut else b).write(line)


def data(work: Path, rows: int) -> dict[str, Any]:
    """Synthetic raw train/test files and their shards (cached in `work` by row count)."""
    d = work / f"criteo-{rows}"
    d.mkdir(parents=True, exist_ok=True)
    out = {"dir": d, "rows": rows}
    if not (d / "test.txt").exists():
        t = time.perf_counter()
        subprocess.run(_ravfm("synth", "criteo", "--rows", str(rows), "--out", str(d / "raw.txt"),
                              "--seed", "0"), check=True, capture_output=True)  # fmt: skip
        _split_lines(d / "raw.txt", d / "train.txt", d / "test.txt")
        (d / "raw.txt").unlink()
        out["synth_s"] = time.perf_counter() - t
    for split in ("train", "test"):
        shards = d / f"shards-{split}"
        shutil.rmtree(shards, ignore_errors=True)
        res = _check(run_measured(_ravfm("convert", "criteo", str(d / f"{split}.txt"), "--out",
                                         str(shards), "--split", split)), "convert")  # fmt: skip
        out[f"convert_{split}_s"] = res["wall_s"]
    return out


def _spec_of(run_dir: Path) -> Path:
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return ckpt / "spec"


def ravfm_run(work: Path, d: dict, seed: int) -> dict[str, Any]:
    """One seed: the whole train command, then the whole score command on the test rows."""
    from ravfm.scored import read_scores

    shutil.rmtree(d["dir"] / "shards-train" / "_features", ignore_errors=True)  # stats included
    name, runs = f"e2e-s{seed}", work / "runs"
    shutil.rmtree(runs / name, ignore_errors=True)
    train = _check(run_measured(_ravfm(
        "train", "--config", str(JOB), f"name={name}", f"runs_dir={runs}",
        f"data.shards={d['dir'] / 'shards-train'}", "train.epochs=1", f"seed={seed}",
    )), "ravfm train")  # fmt: skip
    summary = json.loads((runs / name / "summary.json").read_text())
    epoch = summary["epochs"][0]
    n = epoch["train"]["n"]
    preds = work / f"preds-{name}"
    shutil.rmtree(preds, ignore_errors=True)
    score = _check(run_measured(_ravfm(
        "score", "--checkpoint", str(runs / name / "checkpoints"),
        "--input", str(d["dir"] / "shards-test"), "--output", str(preds), "--keep", "label",
    )), "ravfm score")  # fmt: skip
    got = read_scores(str(preds))
    metrics = binary_metrics(got["label"].to_numpy(), got["prediction"].to_numpy())
    ckpt = sorted((runs / name / "checkpoints").glob("step-*"))[-1]
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    return {
        "seed": seed,
        "wall_s": train["wall_s"],
        "samples_per_s": n / epoch["seconds"],
        "samples_per_s_steady": n / max(epoch["seconds"] - epoch["first_batch_seconds"], 1e-9),
        "peak_pss_mb": train["peak_pss_mb"],
        "score_wall_s": score["wall_s"],
        "score_peak_pss_mb": score["peak_pss_mb"],
        "checkpoint_bytes": sum(f["bytes"] for f in files.values()),
        "table_rows": summary["num_rows"],
        "timings": summary.get("timings", {}),
        **metrics,
    }


def bare(work: Path, d: dict) -> dict[str, Any]:
    res = _check(run_measured([sys.executable, "-m", "bench.train_bare", "--config", str(JOB),
                               "--spec", str(_spec_of(work / "runs" / "e2e-s0")),
                               "--shards", str(d["dir"] / "shards-train"), "--threads",
                               str(os.cpu_count() or 1)]), "bare step")  # fmt: skip
    return json.loads(res["stdout"].strip().splitlines()[-1])


def prepare_peers(work: Path, d: dict) -> dict[str, Any]:
    """The peers' inputs from ravfm's hashed ids of the same rows (timed apart)."""
    from bench.peers.prepare import hashed_split, prepare_ctr

    spec = str(_spec_of(work / "runs" / "e2e-s0"))
    t = time.perf_counter()
    train = hashed_split(str(d["dir"] / "shards-train"), "train", spec)
    test = hashed_split(str(d["dir"] / "shards-test"), "test", spec)
    hash_s = time.perf_counter() - t
    out = prepare_ctr(train, test, work / f"peers-{d['rows']}")
    return {**out, "hash_s": hash_s, "test_label": test["label"]}


def peer_status() -> dict[str, str]:
    path = ROOT / ".peers-venv" / "peers-status.json"
    if not PEERS_PY.exists() or not path.exists():
        return {p: "failed: .peers-venv is missing (run `make peers`)" for p in PEERS}
    status = json.loads(path.read_text())
    return {p: status.get("torch" if p == "pytorch" else p, "failed: not installed") for p in PEERS}


def peer_run(peer: str, prep: dict, seed: int, work: Path) -> dict[str, Any]:
    src = Path(prep["dir"])
    ext = "libsvm" if peer == "xlearn" else "npz"
    out = work / f"pred-{peer}-s{seed}.npy"
    env = {**os.environ, "USER": os.environ.get("USER") or "bench"}
    res = run_measured([str(PEERS_PY), str(ROOT / "bench" / "peers" / PEERS[peer]),
                        "--train", str(src / f"train.{ext}"), "--test", str(src / f"test.{ext}"),
                        "--out", str(out), "--seed", str(seed)], env=env)  # fmt: skip
    _check(res, peer)
    line = json.loads(res["stdout"].strip().splitlines()[-1])
    metrics = binary_metrics(prep["test_label"], np.load(out))
    return {"seed": seed, "wall_s": res["wall_s"], "peak_pss_mb": res["peak_pss_mb"],
            "samples_per_s": line.get("samples_per_s"),
            "samples_per_s_steady": line.get("samples_per_s_steady"),
            "settings": line.get("settings"), **metrics}  # fmt: skip


def score_scale(work: Path, rows: int, checkpoint: Path) -> dict[str, Any]:
    """The whole `ravfm score` on `rows` rows of another synthetic file."""
    d = work / f"score-{rows}"
    if not (d / "shards" / "_index.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(_ravfm("synth", "criteo", "--rows", str(rows), "--out", str(d / "raw.txt"),
                              "--seed", "1"), check=True, capture_output=True)  # fmt: skip
        subprocess.run(_ravfm("convert", "criteo", str(d / "raw.txt"), "--out", str(d / "shards"),
                              "--split", "test"), check=True, capture_output=True)  # fmt: skip
        (d / "raw.txt").unlink()
    shutil.rmtree(d / "preds", ignore_errors=True)
    res = _check(run_measured(_ravfm("score", "--checkpoint", str(checkpoint), "--input",
                                     str(d / "shards"), "--output", str(d / "preds"))),
                 "ravfm score at scale")  # fmt: skip
    shutil.rmtree(d / "preds", ignore_errors=True)
    return {"rows": rows, "wall_s": res["wall_s"], "rows_per_s": rows / res["wall_s"],
            "peak_pss_mb": res["peak_pss_mb"]}  # fmt: skip


def _median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main(argv: list[str] | None = None) -> dict:
    from bench.e2e_report import real_samples, report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--score-rows", type=int, default=5_000_000)
    ap.add_argument("--work", default=os.environ.get("RAVFM_BENCH_WORK", "/tmp/ravfm-e2e"))
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--real", action="store_true", help="also the real samples in shared/data")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"e2e: {a.rows:,} rows, {a.seeds} seed(s), work dir {work}", flush=True)
    d = data(work, a.rows)
    runs = [ravfm_run(work, d, s) for s in range(a.seeds)]
    ravfm = {"name": "ravfm", **{k: _median(runs, k) for k in runs[0] if k not in
                                 ("seed", "timings")}, "runs": runs}  # fmt: skip
    systems, status = [ravfm], peer_status()
    prep = None
    if not a.skip_peers:
        prep = prepare_peers(work, d)
        for peer, state in status.items():
            if state != "ok":
                systems.append({"name": peer, "failed": state})
                continue
            try:
                pr = [peer_run(peer, prep, s, work) for s in range(a.seeds)]
            except RuntimeError as e:
                systems.append({"name": peer, "failed": str(e).splitlines()[0]})
                continue
            systems.append({"name": peer, **{k: _median(pr, k) for k in pr[0]
                                             if k not in ("seed", "settings")},
                            "settings": pr[0]["settings"], "runs": pr})  # fmt: skip
    figures = {
        "rows": a.rows,
        "data": {k: v for k, v in d.items() if k != "dir"},
        "systems": systems,
        "ravfm_bare": bare(work, d),
        "checkpoint_bytes": ravfm["checkpoint_bytes"],
        "score_100k_wall_s": ravfm["score_wall_s"],
        "peer_inputs": None if prep is None else {k: v for k, v in prep.items()
                                                  if k not in ("test_label", "dir")},
    }  # fmt: skip
    figures["ravfm_bare_sps"] = figures["ravfm_bare"]["samples_per_s"]
    ckpt = work / "runs" / "e2e-s0" / "checkpoints"
    figures["score_scale"] = score_scale(work, a.score_rows, ckpt) if a.score_rows else None
    figures["score_5m_rows_per_s"] = (figures["score_scale"] or {}).get("rows_per_s")
    if a.real:
        figures["real"] = real_samples(work)
    markdown = report(figures)
    print(markdown)
    name = "e2e" if a.rows == 1_000_000 else f"e2e-{a.rows}"
    write_result(name, figures, markdown)
    from bench.run_all import write_benchmarks_md

    write_benchmarks_md()
    return figures


if __name__ == "__main__":
    main()
