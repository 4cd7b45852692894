"""The end-to-end benchmark's tables and targets (met / NOT MET), and its real-sample check."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import table

__all__ = ["report", "targets", "real_samples"]

ROOT = Path(__file__).resolve().parent.parent


def _sys(figures: dict, name: str) -> dict:
    return next((s for s in figures["systems"] if s["name"] == name), {})


def _ok(flag: bool | None) -> str:
    return "n/a" if flag is None else ("met" if flag else "NOT MET")


def targets(f: dict) -> list[list[Any]]:
    """[target, measured, met] rows; a missing peer makes its comparison n/a."""
    ravfm, torchrec, xlearn = _sys(f, "ravfm"), _sys(f, "torchrec"), _sys(f, "xlearn")
    ratio = ravfm["samples_per_s"] / f["ravfm_bare_sps"]
    rows = [
        ["ravfm train samples/s over the epoch >= 0.6x its bare step", f"{ratio:.2f}x", _ok(ratio >= 0.6)],
        ["moonshot: >= 0.8x the bare step", f"{ratio:.2f}x", _ok(ratio >= 0.8)],
    ]  # fmt: skip
    for peer, label in ((torchrec, "TorchRec's"), (xlearn, "moonshot: xLearn's")):
        w = peer.get("wall_s")
        rows.append([f"whole ravfm train <= {label} whole process",
                     f"{ravfm['wall_s']:.1f} s vs {w:.1f} s" if w else "peer failed",
                     _ok(ravfm["wall_s"] <= w if w else None)])  # fmt: skip
    if f["rows"] >= 10_000_000 and xlearn.get("samples_per_s"):
        rows.append(["10M rows: samples/s over the epoch >= xLearn's",
                     f"{ravfm['samples_per_s']:,.0f} vs {xlearn['samples_per_s']:,.0f}",
                     _ok(ravfm["samples_per_s"] >= xlearn["samples_per_s"])])  # fmt: skip
    rows.append(["score 100,000 rows, whole command < 5 s", f"{f['score_100k_wall_s']:.2f} s",
                 _ok(f["score_100k_wall_s"] < 5)])  # fmt: skip
    if f.get("score_5m_rows_per_s"):
        sc = f["score_scale"]
        rows.append([f"score {sc['rows']:,} rows >= 1M rows/s end to end",
                     f"{sc['rows_per_s']:,.0f} rows/s", _ok(sc["rows_per_s"] >= 1e6)])  # fmt: skip
    tr = torchrec.get("peak_pss_mb")
    rows += [
        ["peak PSS of ravfm train <= 2x TorchRec's",
         f"{ravfm['peak_pss_mb']:,.0f} vs {tr:,.0f} MB" if tr else "peer failed",
         _ok(ravfm["peak_pss_mb"] <= 2 * tr if tr else None)],
        ["moonshot: <= TorchRec's", "", _ok(ravfm["peak_pss_mb"] <= tr if tr else None)],
    ]  # fmt: skip
    peers = [s for s in f["systems"] if s["name"] != "ravfm" and s.get("auc") is not None]
    if peers:
        best = max(peers, key=lambda s: s["auc"])
        rows.append([f"default job test AUC >= best peer ({best['name']}) - 0.002 (median of seeds)",
                     f"{ravfm['auc']:.4f} vs {best['auc']:.4f}",
                     _ok(ravfm["auc"] >= best["auc"] - 0.002)])  # fmt: skip
    for r in f.get("real", []):
        rows.append([f"{r['dataset']} sample: test AUC within 0.01 of xLearn on the same split",
                     f"{r['ravfm_auc']:.4f} vs {r['xlearn_auc']:.4f}",
                     _ok(r["ravfm_auc"] >= r["xlearn_auc"] - 0.01)])  # fmt: skip
    return rows


def report(f: dict) -> str:
    headers = ["trainer", "whole command s", "samples/s (epoch)", "samples/s (after 1st batch)",
               "test AUC", "log loss", "peak PSS MB"]  # fmt: skip
    rows = []
    for s in f["systems"]:
        if s.get("failed"):
            rows.append([s["name"], f"FAILED: {s['failed']}", "", "", "", "", ""])
            continue
        rows.append([s["name"], s["wall_s"], s.get("samples_per_s") or "",
                     s.get("samples_per_s_steady") or "", s["auc"], s["logloss"],
                     s["peak_pss_mb"]])  # fmt: skip
    ravfm = _sys(f, "ravfm")
    t = ravfm["runs"][0].get("timings", {})
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in t.items() if isinstance(v, (int, float)))
    data = f["data"]
    lines = [
        f"{f['rows']:,} synthetic Criteo rows (90% train file, 10% test file); medians of "
        f"{len(ravfm['runs'])} seeds; one epoch, k=16, 2 threads everywhere.",
        "",
        table(headers, rows),
        "",
        f"- ravfm's bare training step (rows in memory, the job's table of "
        f"{ravfm['table_rows']:,} rows, optimizer and batch): {f['ravfm_bare_sps']:,.0f} "
        f"samples/s; `ravfm train` reaches {ravfm['samples_per_s'] / f['ravfm_bare_sps']:.2f}x "
        "of it over the epoch, reading and hashing included.",
        f"- ravfm train by phase (seed 0): {phases}.",
        f"- checkpoint {f['checkpoint_bytes'] / 2**20:,.1f} MiB; `ravfm score` of the 100,000 "
        f"test rows: {f['score_100k_wall_s']:.2f} s whole command.",
        f"- apart: convert train {data.get('convert_train_s', 0):.1f} s, test "
        f"{data.get('convert_test_s', 0):.1f} s.",
    ]
    if f.get("peer_inputs"):
        p = f["peer_inputs"]
        lines.append(f"- apart: the peers' inputs from ravfm's hashed ids: hashing "
                     f"{p['hash_s']:.1f} s, id arrays {p.get('train_npz_s', 0):.1f} s, libSVM "
                     f"text {p.get('train_libsvm_s', 0):.1f} s (train).")  # fmt: skip
    if f.get("score_scale"):
        sc = f["score_scale"]
        lines.append(f"- `ravfm score` of {sc['rows']:,} rows: {sc['wall_s']:.1f} s, "
                     f"{sc['rows_per_s']:,.0f} rows/s end to end.")  # fmt: skip
    for r in f.get("real", []):
        lines.append(
            f"- real {r['dataset']} sample ({r['command']}): test AUC "
            f"{r['ravfm_auc']:.4f}; xLearn on the same split {r['xlearn_auc']:.4f}."
        )
    lines += ["", table(["target", "measured", ""], targets(f))]
    return "\n".join(lines)


def real_samples(work: Path) -> list[dict]:
    """Each default job on a real sample, and xLearn (its defaults, 10 epochs) on the same
    train and test rows (ravfm's hashed ids)."""
    from bench.e2e import PEERS_PY, _check, _ravfm
    from bench.peers.peer_io import binary_metrics
    from bench.peers.prepare import hashed_split, write_libsvm
    from bench.peers.procmem import run_measured
    from ravfm.settings import shared_data_dir

    out = []
    samples = {"criteo": "criteo/dac_sample_8k.txt", "avazu": "avazu/avazu_sample_9k.csv"}
    for ds, rel in samples.items():
        shards, runs, name = work / f"real-{ds}", work / "runs", f"real-{ds}"
        for p in (shards, runs / name):
            shutil.rmtree(p, ignore_errors=True)
        src = shared_data_dir() / rel
        args = ["train", "--config", str(ROOT / "jobs" / f"{ds}_fm.yaml"), f"name={name}",
                f"runs_dir={runs}", f"data.source={src}", f"data.shards={shards}"]  # fmt: skip
        _check(run_measured(_ravfm(*args)), f"ravfm train on the {ds} sample")
        summary = json.loads((runs / name / "summary.json").read_text())
        spec = str(sorted((runs / name / "checkpoints").glob("step-*"))[-1] / "spec")
        paths = {}
        for split in ("train", "test"):
            h = hashed_split(str(shards), split, spec)
            paths[split] = write_libsvm(h["ids"], h["label"], work / f"real-{ds}-{split}.libsvm")
            labels = h["label"]
        pred = work / f"real-{ds}-xlearn.npy"
        env = {**os.environ, "USER": os.environ.get("USER") or "bench"}
        res = run_measured([str(PEERS_PY), str(ROOT / "bench" / "peers" / "xlearn_fm.py"),
                            "--train", str(paths["train"]), "--test", str(paths["test"]),
                            "--out", str(pred), "--epochs", "10"], env=env)  # fmt: skip
        xl = (
            binary_metrics(labels, np.load(pred))["auc"] if res["returncode"] == 0 else float("nan")
        )
        out.append({"dataset": ds, "command": "ravfm " + " ".join(args[:3]) + f" data.source={rel}",
                    "ravfm_auc": summary["test"]["auc"], "xlearn_auc": xl,
                    "epochs": len(summary["epochs"])})  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit("run python -m bench.e2e")
