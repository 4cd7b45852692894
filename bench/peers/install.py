"""`make peers`: the peers' venv (.peers-venv), each peer installed and smoke-tested on its own.

Runs under the system Python 3.11 (stdlib only). torch==2.13.0 and the common libraries first
(a failure there stops everything); then xLearn, TorchRec and myFM one by one, each followed by a
smoke test in the new venv, so one peer failing leaves the others usable. The outcome goes to
VENV/peers-status.json: {"torch": ..., "torchrec": ..., "xlearn": ..., "myfm": ...}, each "ok"
or "failed: <one line>", which the benchmark reports instead of leaving a peer out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

__all__ = ["main", "PEERS"]

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"

_TORCHREC_SMOKE = """
import torch, fbgemm_gpu, torchrec
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
    name="t", embedding_dim=4, num_embeddings=10, feature_names=["a", "b"])])
kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 3, 4]),
                        lengths=torch.ones(4, dtype=torch.int32))
assert ebc(kjt).values().shape == (2, 8)
assert torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2])).tolist() == [0, 1, 3]
"""

_XLEARN_SMOKE = """
import os, tempfile
os.environ.setdefault("USER", "peers")
import xlearn as xl
with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "t.txt")
    with open(p, "w") as f:
        f.write("".join(f"{i % 2} {i % 2}:1 {2 + i % 3}:1\\n" for i in range(64)))
    fm = xl.create_fm(); fm.setTrain(p); fm.setQuiet()
    fm.fit({"task": "binary", "k": 4, "epoch": 1, "nthread": 1}, os.path.join(d, "m"))
    assert os.path.getsize(os.path.join(d, "m")) > 0
"""

_MYFM_SMOKE = """
import numpy as np, scipy.sparse as sp, myfm
X = sp.csr_matrix(np.eye(8)[np.arange(40) % 8]); y = (np.arange(40) % 8).astype(float)
fm = myfm.MyFMRegressor(rank=2).fit(X, y, n_iter=10, n_kept_samples=5)
assert fm.predict(X).shape == (40,)
"""

# name -> (pip argument lists, run one after another; smoke test run in the venv)
PEERS: dict[str, tuple[list[list[str]], str]] = {
    "torchrec": (
        [
            ["--no-deps", "torchrec", "fbgemm-gpu-cpu"],
            ["tensordict", "torchmetrics", "tqdm", "pyre-extensions"],
        ],
        _TORCHREC_SMOKE,
    ),
    "xlearn": ([["xlearn"]], _XLEARN_SMOKE),
    "myfm": ([["myfm", "setuptools"]], _MYFM_SMOKE),
}


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return ((errors or lines or ["no output"])[-1])[:300]


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str | None:
    """Run cmd; None when it succeeds, else a one-line reason."""
    shown = cmd[:-1] + ["<smoke test>"] if cmd[-2] == "-c" else cmd
    print("+", " ".join(shown), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode == 0:
        return None
    sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
    return _one_line(p.stderr or p.stdout)


def _pip(py: Path, args: list[str]) -> str | None:
    return _run([str(py), "-m", "pip", "install", "-q", "-c", str(REQUIREMENTS), *args])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=".peers-venv")
    ap.add_argument("--only", nargs="*", choices=sorted(PEERS), help="peers to (re)install")
    args = ap.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        print(f"make peers: needs Python 3.11, got {sys.version.split()[0]}; set PYTHON=python3.11")
        return 2
    root = Path(args.venv)
    py = root / "bin" / "python"
    if not py.exists():
        venv.EnvBuilder(with_pip=True).create(root)
    # Base: pip, torch (the local CPU wheel; first, so nothing else picks another build), common.
    for step in (["pip"], ["torch"], ["numpy", "pyarrow", "scikit-learn", "scipy"]):
        why = _pip(py, step)
        if why:
            print(f"make peers: installing {' '.join(step)} failed: {why}")
            return 1
    status_path = root / "peers-status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    status["torch"] = "ok"
    env = {**os.environ, "USER": os.environ.get("USER") or "peers"}
    for name in args.only or sorted(PEERS):
        steps, smoke = PEERS[name]
        why = next((w for w in (_pip(py, s) for s in steps) if w), None)
        why = why or _run([str(py), "-W", "ignore", "-c", smoke], env=env)
        status[name] = "ok" if why is None else f"failed: {why}"
        print(f"{name}: {status[name]}", flush=True)
        status_path.write_text(json.dumps(status, indent=2, sort_keys=True) + "\n")
    print(f"wrote {status_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
