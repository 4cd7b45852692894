"""xLearn FM peer: xl.create_fm() on libSVM text, per-row AdaGrad, Hogwild threads.

    .peers-venv/bin/python bench/peers/xlearn_fm.py --train T.libsvm --test S.libsvm --out p.npy

xLearn reads the text itself, so load and train are both inside fit(); its own log splits them
("Time cost for reading problem", the epoch table's time column), and the JSON line reports
those beside our wall clock of the whole fit() and predict() calls. xLearn writes a `.bin`
cache beside each text file on first read and reuses it later: this runner deletes any stale
one first (every run parses the text) and the new one after. xLearn aborts when USER is unset,
so it is set here. Its C++ log goes to stderr; one JSON line goes to stdout (README.md).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from peer_io import binary_metrics, emit, set_threads

__all__ = ["main", "parse_log"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_log(text: str) -> dict[str, float]:
    """xLearn's fit log -> its own seconds: read_s, init_s, epoch_s (summed), save_s, total_s."""
    text = _ANSI.sub("", text)
    out: dict[str, float] = {}
    for key, pat in (
        ("read_s", r"Time cost for reading problem: ([\d.]+)"),
        ("init_s", r"Time cost for model initial: ([\d.]+)"),
        ("save_s", r"Time cost for saving model: ([\d.]+)"),
        ("total_s", r"Total time cost: ([\d.]+)"),
    ):
        found = re.findall(pat, text)
        if found:
            out[key] = sum(float(v) for v in found)
    # epoch rows: "[  100%      ]     1    0.955825    0.55" (epoch, train loss[, metric], seconds)
    rows = re.findall(r"^\[ *\d+% *\]\s+(\d+)\s+([\d.]+)((?:\s+[\d.]+)+)\s*$", text, re.M)
    if rows:
        out["epoch_s"] = sum(float(r[2].split()[-1]) for r in rows)
        out["train_loss"] = [float(r[1]) for r in rows]
    return out


class _CaptureFd1:
    """Send C-level stdout (fd 1) into a temp file while the block runs; .text has it."""

    def __enter__(self) -> _CaptureFd1:
        sys.stdout.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = os.dup(1)
        os.dup2(self.file.fileno(), 1)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        os.dup2(self.saved, 1)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()
        sys.stderr.write(self.text)


def _labels(path: str):
    """The first token of each libSVM line -> label (B,) float32 (after the timers)."""
    import numpy as np

    with open(path, "rb") as f:
        return np.array([float(line.split(b" ", 1)[0]) for line in f], dtype=np.float32)


def _drop_bin(path: str) -> None:
    Path(path + ".bin").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="train libSVM (prepare.write_libsvm)")
    ap.add_argument("--test", required=True, help="test libSVM")
    ap.add_argument("--out", required=True, help="test probabilities, .npy float32")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.2, help="xLearn's default and examples' lr")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.00002, help="L2 (xLearn's)")
    ap.add_argument("--init", type=float, default=0.66, help="xLearn's init scale (default)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--norm", action="store_true", help="keep xLearn's instance-wise norm")
    ap.add_argument("--seed", type=int, default=0, help="recorded; xLearn has no seed")
    args = ap.parse_args(argv)
    os.environ["USER"] = os.environ.get("USER") or "peers"  # xLearn aborts without it
    set_threads(args.threads)
    import numpy as np
    import xlearn as xl

    params = {
        "task": "binary",
        "metric": "none",
        "opt": "adagrad",
        "lr": args.lr,
        "lambda": args.lam,
        "k": args.k,
        "init": args.init,
        "epoch": args.epochs,
        "nthread": args.threads,
    }
    with tempfile.TemporaryDirectory(prefix="xlearn-") as tmp:
        model_path, pred_path = os.path.join(tmp, "model.bin"), os.path.join(tmp, "pred.txt")
        for p in (args.train, args.test):
            _drop_bin(p)
        try:
            fm = xl.create_fm()
            fm.setTrain(args.train)
            if not args.norm:
                fm.disableNorm()
            t = time.perf_counter()
            with _CaptureFd1() as fit_log:
                fm.fit(params, model_path)
            fit_s = time.perf_counter() - t
            fm = xl.create_fm()
            fm.setTest(args.test)
            fm.setSigmoid()
            if not args.norm:
                fm.disableNorm()
            t = time.perf_counter()
            with _CaptureFd1():
                fm.predict(model_path, pred_path)
            predict_s = time.perf_counter() - t
        finally:
            for p in (args.train, args.test):
                _drop_bin(p)
        prob = np.loadtxt(pred_path, dtype=np.float32, ndmin=1)
    np.save(args.out, prob)
    own = parse_log(fit_log.text)
    with open(args.train, "rb") as f:
        train_rows = sum(1 for _ in f)
    train_s = own.get("epoch_s")
    test_label = _labels(args.test)
    emit(
        {
            "peer": "xlearn",
            "load_s": own.get("read_s"),
            "train_s": train_s if train_s is not None else fit_s,
            "predict_s": predict_s,
            "fit_s": fit_s,
            "xlearn_log": own,
            "samples_per_s": train_rows * args.epochs / (train_s or fit_s),
            "samples_per_s_steady": None,
            "epochs": args.epochs,
            "threads": args.threads,
            "train_rows": train_rows,
            "test_rows": len(prob),
            "test": binary_metrics(test_label, prob),
            "versions": {"xlearn": getattr(xl, "__version__", "0.40a1")},
            "settings": {
                "model": "fm (xl.create_fm)",
                **params,
                "norm": args.norm,
                "optimizer": "AdaGrad per row (xLearn's default opt), gradient caches start at 1",
                "batch": 1,
                "init_dist": f"v ~ U(0, {args.init}/sqrt(k)), w = 0, bias = 0 (xLearn's own)",
                "loss": "cross-entropy (task binary); predictions through setSigmoid()",
                "order": "xLearn shuffles the train rows itself (std::random_shuffle, no seed)",
                "lock_free": True,
            },
        }
    )


if __name__ == "__main__":
    sys.exit(main())
