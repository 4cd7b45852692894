"""Plain-PyTorch FM peer: nn.Embedding(N, K+1, sparse=True) + SparseAdam, Adam for the bias.

    .peers-venv/bin/python bench/peers/torch_sparse_fm.py --train T.npz --test S.npz --out p.npy

One table row per id: [v (K), w]; the model is fm_torch.fm_logits. Train rows are permuted once
(--seed) and read in that order, in batches of --batch; one JSON line on stdout (README.md).
"""

from __future__ import annotations

import sys

from peer_io import Stopwatch, binary_metrics, ctr_args, emit, set_threads

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    args = ctr_args(__doc__.splitlines()[0], batch=8192, lr=1e-3).parse_args(argv)
    set_threads(args.threads)
    import numpy as np
    import torch
    import torch.nn.functional as F
    from fm_torch import fm_logits, init_table_, load_ctr, predict, timings, train_epoch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sw = Stopwatch()
    with sw("load"):
        ids, label, n = load_ctr(args.train, shuffle_seed=args.seed)
        test_ids, test_label, _ = load_ctr(args.test, shuffle_seed=None)
    with sw("setup"):
        table = torch.nn.Embedding(n, args.k + 1, sparse=True)
        init_table_(table.weight, args.k, args.seed)
        bias = torch.nn.Parameter(torch.zeros(1))
        sparse_opt = torch.optim.SparseAdam(table.parameters(), lr=args.lr)
        dense_opt = torch.optim.Adam([bias], lr=args.dense_lr)

    def score(x: torch.Tensor) -> torch.Tensor:
        return fm_logits(bias, table(x), args.k)  # table(x): (b, F, K+1)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sparse_opt.zero_grad(set_to_none=True)
        dense_opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(score(x), y)
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
        return loss.detach()

    epochs = [train_epoch(step, ids, label, args.batch) for _ in range(args.epochs)]
    with sw("predict"):
        prob = predict(score, test_ids, args.eval_batch)
    np.save(args.out, prob)
    emit(
        {
            "peer": "torch_sparse",
            **timings(sw, epochs, len(label), args.batch),
            "epochs": args.epochs,
            "threads": args.threads,
            "train_rows": len(label),
            "test_rows": len(prob),
            "num_rows": n,
            "test": binary_metrics(test_label.numpy(), prob),
            "versions": {"torch": torch.__version__},
            "settings": {
                "model": "fm",
                "k": args.k,
                "table": f"nn.Embedding({n}, {args.k + 1}, sparse=True): [v (K), w]",
                "optimizer": "SparseAdam (table) + Adam (bias)",
                "lr": args.lr,
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
