"""TorchRec FM peer: DistributedModelParallel on a 1-rank gloo group (CPU), fused row-wise Adagrad.

    .peers-venv/bin/python bench/peers/torchrec_fm.py --train T.npz --test S.npz --out p.npy

One EmbeddingBagCollection table of N rows shared by the F features (KeyedJaggedTensor, one id
per feature per row, SUM pooling of that one id), row layout [v (K), w, pad]: the fused (FBGEMM
TBE) kernel needs the row width divisible by 4, so K=16 + 1 is padded to 20 with columns that
stay 0 (they get zero gradient). The optimizer is fused into backward through
apply_optimizer_in_backward(RowWiseAdagrad); the dense bias, wrapped in DDP by DMP, takes
torch Adam. The model is fm_torch.fm_logits; one JSON line on stdout (README.md).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

from peer_io import Stopwatch, binary_metrics, ctr_args, emit, set_threads

__all__ = ["main"]


def _round4(d: int) -> int:
    return (d + 3) // 4 * 4


def main(argv: list[str] | None = None) -> None:
    ap = ctr_args(__doc__.splitlines()[0], batch=8192, lr=0.05)
    ap.add_argument("--eps", type=float, default=1e-8, help="row-wise Adagrad epsilon")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import torchrec
    from fm_torch import fm_logits, init_table_, load_ctr, predict, timings, train_epoch
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed import DistributedModelParallel
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    logging.getLogger("torchrec").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sw = Stopwatch()
    with sw("load"):
        ids, label, n = load_ctr(args.train, shuffle_seed=args.seed)
        test_ids, test_label, _ = load_ctr(args.test, shuffle_seed=None)
    f = ids.shape[1]
    keys = [f"f{i}" for i in range(f)]
    dim = _round4(args.k + 1)

    class FM(torch.nn.Module):
        """kjt (F keys x b ids) -> logits (b,)."""

        def __init__(self) -> None:
            super().__init__()
            table = EmbeddingBagConfig(
                name="fm", embedding_dim=dim, num_embeddings=n, feature_names=keys
            )
            self.ebc = EmbeddingBagCollection(tables=[table], device=torch.device("meta"))
            self.bias = torch.nn.Parameter(torch.zeros(1))

        def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
            e = self.ebc(kjt).values()  # (b, F * D), keys in order
            return fm_logits(self.bias, e.view(-1, f, dim), args.k)

    def to_kjt(x: torch.Tensor) -> KeyedJaggedTensor:
        """ids (b, F) -> KJT: key f holds the b ids of field f, one per row."""
        return KeyedJaggedTensor(
            keys=keys,
            values=x.t().reshape(-1),  # (F * b,): feature-major
            lengths=torch.ones(x.numel(), dtype=torch.int32),
        )

    store = tempfile.NamedTemporaryFile(prefix="torchrec-pg-", delete=False).name
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        with sw("setup"):
            model = FM()
            apply_optimizer_in_backward(
                RowWiseAdagrad, model.ebc.parameters(), {"lr": args.lr, "eps": args.eps}
            )
            model = DistributedModelParallel(model, device=torch.device("cpu"))
            (weight,) = [p for name, p in model.named_parameters() if "embedding_bags" in name]
            init_table_(weight, args.k, args.seed)
            dense = [p for name, p in model.named_parameters() if name.endswith("bias")]
            dense_opt = torch.optim.Adam(dense, lr=args.dense_lr)
        plan = str(model.plan).strip()

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            dense_opt.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(model(to_kjt(x)), y)
            loss.backward()  # the table's row-wise Adagrad runs inside backward
            dense_opt.step()
            return loss.detach()

        model.train()
        epochs = [train_epoch(step, ids, label, args.batch) for _ in range(args.epochs)]
        model.eval()
        with sw("predict"):
            prob = predict(lambda x: model(to_kjt(x)), test_ids, args.eval_batch)
    finally:
        dist.destroy_process_group()
        os.unlink(store)
    np.save(args.out, prob)
    emit(
        {
            "peer": "torchrec",
            **timings(sw, epochs, len(label), args.batch),
            "epochs": args.epochs,
            "threads": args.threads,
            "train_rows": len(label),
            "test_rows": len(prob),
            "num_rows": n,
            "test": binary_metrics(test_label.numpy(), prob),
            "versions": {"torch": torch.__version__, "torchrec": torchrec.__version__},
            "settings": {
                "model": "fm",
                "k": args.k,
                "table": f"EmbeddingBagCollection, 1 table {n} x {dim} shared by {f} features: "
                f"[v ({args.k}), w, {dim - args.k - 1} zero pad]",
                "sharding": "DistributedModelParallel, 1 rank, gloo, CPU; planner's plan: "
                + " ".join(plan.split()),
                "optimizer": "fused RowWiseAdagrad (apply_optimizer_in_backward) + Adam (bias)",
                "lr": args.lr,
                "eps": args.eps,
                "dense_lr": args.dense_lr,
                "batch": args.batch,
                "init": "v ~ N(0, 0.01^2), w = 0, bias = 0",
                "loss": "BCE with logits, batch mean",
                "order": f"train rows permuted once with seed {args.seed}",
                "seed": args.seed,
            },
        }
    )


if __name__ == "__main__":
    sys.exit(main())
