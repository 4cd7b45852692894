"""Hand check of the peers' venv: every runner on a small planted problem it can learn.

    .venv/bin/python -m bench.peers.check [--peers-venv .peers-venv] [--rows 20000]

Runs in ravfm's venv (prepare.py writes the inputs); each runner runs in the peers' venv under
procmem.run_measured. A planted FM over F fields of disjoint id ranges in one shared space gives
binary labels (CTR runners, myFM's classifier) and real targets (myFM's regressors). Each
runner must exit 0, write one prediction per test row and beat chance: AUC > 0.5, or RMSE below
the targets' standard deviation. Peers that `make peers` marked failed are reported as such.
The torch runners use batch 256 here so that 20k rows make enough steps; timings are not
benchmarks. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.peers.peer_io import binary_metrics
from bench.peers.prepare import write_id_arrays, write_libsvm, write_myfm_npz
from bench.peers.procmem import run_measured

__all__ = ["planted", "main"]

HERE = Path(__file__).resolve().parent


def planted(rows: int, fields: int = 8, per_field: int = 50, k: int = 4, seed: int = 0) -> dict:
    """Planted FM: ids (B, F) int64 (field f owns ids f*per_field ...), logit (B,), N."""
    rng = np.random.default_rng(seed)
    n = fields * per_field
    ids = rng.integers(0, per_field, size=(rows, fields)) + np.arange(fields) * per_field
    w = rng.normal(0, 0.6, n)
    v = rng.normal(0, 0.35, (n, k))
    s = v[ids].sum(axis=1)  # (B, K)
    logit = w[ids].sum(axis=1) + 0.5 * ((s * s).sum(axis=1) - (v[ids] ** 2).sum(axis=(1, 2)))
    return {"ids": ids, "logit": logit - np.median(logit), "num_rows": n}


def _runs(d: Path, py: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (peer in peers-status.json, command)."""
    ctr = ["--train", str(d / "train.npz"), "--test", str(d / "test.npz"), "--batch", "256"]
    xl = ["--train", str(d / "train.libsvm"), "--test", str(d / "test.libsvm")]
    fm = [py, "-W", "ignore", str(HERE / "myfm_runner.py"), "--n-iter", "60"]
    return {
        "xlearn_fm": ("xlearn", [py, str(HERE / "xlearn_fm.py"), *xl]),
        "torchrec_fm": ("torchrec", [py, str(HERE / "torchrec_fm.py"), *ctr]),
        "torch_sparse_fm": ("torch", [py, str(HERE / "torch_sparse_fm.py"), *ctr, "--lr", "0.01"]),
        "myfm gibbs-classifier": (
            "myfm",
            [*fm, "--data", str(d / "myfm_binary.npz"), "--model", "gibbs-classifier"],
        ),
        "myfm gibbs-regressor": (
            "myfm",
            [*fm, "--data", str(d / "myfm_real.npz"), "--model", "gibbs-regressor"],
        ),
        "myfm vb-regressor": (
            "myfm",
            [*fm, "--data", str(d / "myfm_real.npz"), "--model", "vb-regressor"],
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers-venv", default=".peers-venv")
    ap.add_argument("--rows", type=int, default=20000, help="train rows (test: a quarter)")
    ap.add_argument("--only", nargs="*", help="runner names to run (default all)")
    args = ap.parse_args(argv)
    venv = Path(args.peers_venv)
    py = str(venv / "bin" / "python")
    status_path = venv / "peers-status.json"
    if not status_path.exists():
        print(f"{status_path} not found: run `make peers` first")
        return 2
    status = json.loads(status_path.read_text())
    data = planted(args.rows + args.rows // 4)
    rng = np.random.default_rng(1)
    prob = 1 / (1 + np.exp(-data["logit"]))
    binary = (rng.random(len(prob)) < prob).astype(np.float32)
    real = (3 + data["logit"] / data["logit"].std() + rng.normal(0, 0.5, len(prob))).astype(
        np.float32
    )
    tr, te = slice(0, args.rows), slice(args.rows, None)
    ids, n = data["ids"], data["num_rows"]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="peers-check-") as tmp:
        d = Path(tmp)
        for split, sl in (("train", tr), ("test", te)):
            write_id_arrays(ids[sl], binary[sl], d / f"{split}.npz", n)
            write_libsvm(ids[sl], binary[sl], d / f"{split}.libsvm")
        for name, y in (("binary", binary), ("real", real)):
            write_myfm_npz(ids[tr], y[tr], ids[te], y[te], d / f"myfm_{name}.npz", n)
        print(f"{'runner':24} {'result':8} {'metric':>18} {'wall s':>7} {'peak PSS MB':>11}")
        for name, (peer, cmd) in _runs(d, py).items():
            if args.only and name not in args.only:
                continue
            if status.get(peer, "ok") != "ok":
                print(f"{name:24} FAILED   install: {status[peer]}")
                failures += 1
                continue
            out = d / f"{name.replace(' ', '_')}.npy"
            r = run_measured([*cmd, "--out", str(out)], timeout=600)
            ok, metric = False, "no output"
            if r["returncode"] == 0 and out.exists():
                pred = np.load(out)
                truth = real[te] if name.endswith("regressor") else binary[te]
                if len(pred) != len(truth):
                    metric = f"{len(pred)} rows != {len(truth)}"
                elif name.endswith("regressor"):
                    rmse = float(np.sqrt(np.mean((pred - truth) ** 2)))
                    ok, metric = rmse < truth.std(), f"RMSE {rmse:.3f} < {truth.std():.3f}"
                else:
                    auc = binary_metrics(truth, pred)["auc"]
                    ok, metric = auc > 0.5, f"AUC {auc:.4f}"
                json.loads(r["stdout"].strip().splitlines()[-1])  # the one JSON line parses
            else:
                sys.stderr.write(r["stderr"][-3000:])
            failures += not ok
            print(
                f"{name:24} {'ok' if ok else 'FAILED':8} {metric:>18} {r['wall_s']:7.1f} "
                f"{r['peak_pss_mb']:11.0f}"
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
