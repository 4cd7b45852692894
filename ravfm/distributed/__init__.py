"""Distributed core: the world and its collectives, embedding tables, sparse optimizers.

world.py      World (rank, size, device, backend) and the collectives, also for W = 1
lookup.py     one-sort dedupe, differentiable expand and FM bags over unique rows
rows.py       LocalRows: a rank's rows packed with optimizer state, the sparse-gradient lookup
embedding.py  SparseTable (local or replicated), RowShardedTable (row r on rank r % W),
              table_factory(kind, world, dtype, device)
optim.py      SparseSGD, SparseAdagrad, SparseAdam (lazy), build_optimizers(model, cfg)
dense.py      all_reduce_dense_grads(model, world), DenseOptimizer (biases, VFM priors)

See ../shared/DESIGN.md for how they fit the trainer.
"""
