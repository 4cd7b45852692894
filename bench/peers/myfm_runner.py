"""myFM peer for the accuracy benchmark: Bayesian FM by Gibbs sampling, or variational FM.

    .peers-venv/bin/python bench/peers/myfm_runner.py --data D.npz --model gibbs-regressor --out p.npy

D.npz is prepare.write_myfm_npz's one-hot CSR design (peer_io.py lists the arrays). Models and
their defaults (myFM's README and examples):
  gibbs-regressor   myfm.MyFMRegressor, rank 10, n_iter 200, n_kept_samples 200
  vb-regressor      myfm.VariationalFMRegressor, rank 10, n_iter 200
  gibbs-classifier  myfm.MyFMClassifier (probit), rank 8, n_iter 300, n_kept_samples 250
Predictions: the posterior predictive mean (ratings, unclipped) or P(y = 1). myFM samples in
one thread; --threads sets predict's n_workers. One JSON line on stdout (README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from peer_io import binary_metrics, emit, read_myfm_npz, set_threads

__all__ = ["main", "MODELS"]

# model -> (myfm class name, rank, n_iter, n_kept_samples or None for variational)
MODELS = {
    "gibbs-regressor": ("MyFMRegressor", 10, 200, 200),
    "vb-regressor": ("VariationalFMRegressor", 10, 200, None),
    "gibbs-classifier": ("MyFMClassifier", 8, 300, 250),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="prepare.write_myfm_npz output")
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--out", required=True, help="test predictions, .npy float32")
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--n-iter", type=int, default=None)
    ap.add_argument("--n-kept-samples", type=int, default=None)
    ap.add_argument("--groups", choices=("none", "field"), default="none",
                    help="field: one prior group per field (group_shapes); none: myFM's one group")  # fmt: skip
    ap.add_argument("--seed", type=int, default=42, help="myFM's random_seed (its default 42)")
    ap.add_argument("--threads", type=int, default=2, help="predict's n_workers")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")  # myFM's progress bar: a line per iteration
    import myfm
    import numpy as np
    import scipy.sparse as sp

    cls_name, rank, n_iter, n_kept = MODELS[args.model]
    rank = args.rank or rank
    n_iter = args.n_iter or n_iter
    if n_kept is not None:
        n_kept = min(args.n_kept_samples or n_kept, n_iter)
    t = time.perf_counter()
    z = read_myfm_npz(args.data)
    x = {
        s: sp.csr_matrix(
            (z[f"{s}_data"], z[f"{s}_indices"], z[f"{s}_indptr"]), shape=tuple(z[f"{s}_shape"])
        )
        for s in ("train", "test")
    }
    y_train, y_test = z["train_y"], z["test_y"]
    group_shapes = None
    if args.groups == "field":
        fields = z["field_of_column"]
        if np.any(np.diff(fields) < 0):
            raise SystemExit(
                f"{args.data}: columns are not grouped by field; write it with compact=True"
            )
        group_shapes = np.bincount(fields).tolist()
        group_shapes = [g for g in group_shapes if g > 0]
    load_s = time.perf_counter() - t

    classifier = args.model.endswith("classifier")
    model = getattr(myfm, cls_name)(rank=rank, random_seed=args.seed)
    fit_kw = {"n_iter": n_iter, "group_shapes": group_shapes}
    if n_kept is not None:
        fit_kw["n_kept_samples"] = n_kept
    target = (y_train > 0.5).astype(np.int64) if classifier else y_train.astype(np.float64)
    t = time.perf_counter()
    model.fit(x["train"], target, **fit_kw)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    if classifier:
        pred = model.predict_proba(x["test"], n_workers=args.threads)
    elif n_kept is not None:
        pred = model.predict(x["test"], n_workers=args.threads)
    else:
        pred = model.predict(x["test"])
    predict_s = time.perf_counter() - t
    pred = np.asarray(pred, dtype=np.float32)
    np.save(args.out, pred)
    if classifier:
        test = binary_metrics(y_test, pred)
    else:
        err = pred.astype(np.float64) - y_test
        test = {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err)))}
    rows = x["train"].shape[0]
    emit(
        {
            "peer": "myfm",
            "model": args.model,
            "load_s": load_s,
            "fit_s": fit_s,
            "train_s": fit_s,
            "predict_s": predict_s,
            "samples_per_s": rows * n_iter / fit_s,
            "samples_per_s_steady": None,
            "epochs": n_iter,
            "threads": 1,
            "predict_threads": args.threads,
            "train_rows": rows,
            "test_rows": len(pred),
            "columns": x["train"].shape[1],
            "test": test,
            "versions": {"myfm": myfm.__version__},
            "settings": {
                "class": f"myfm.{cls_name}",
                "rank": rank,
                "n_iter": n_iter,
                "n_kept_samples": n_kept,
                "groups": args.groups,
                "group_shapes": group_shapes,
                "random_seed": args.seed,
                "priors": "myFM defaults (alpha_0 = beta_0 = gamma_0 = reg_0 = 1, init_stdev 0.1)",
                "prediction": "P(y=1)" if classifier else "posterior mean, unclipped",
            },
        }
    )


if __name__ == "__main__":
    sys.exit(main())
