"""A rank's batches: which rows it trains on each epoch, and which it evaluates, as Batches.

`Feed` deals each split's row groups to the ranks (ravfm.features.stream.rank_groups), has
them read and hashed by an executor, and cuts the blocks into shuffled, fixed-size batches
(`rebatch`). The executor is the only thing that differs between hosts: a thread pool in this
process (`thread_blocks`) or Ray Data tasks across a cluster (ravfm.train.worker); both yield
the same blocks in the same order, so they give the same batches and the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ravfm.batch import Batch, from_numpy
from ravfm.distributed.world import World
from ravfm.features.spec import FeatureSpec
from ravfm.features.stream import Block, RowGroup, rank_groups, rebatch, thread_blocks

__all__ = ["Feed", "Blocks", "local_blocks"]

Blocks = Callable[[list[RowGroup]], Iterator[Block]]


def local_blocks(spec: FeatureSpec, threads: int) -> Blocks:
    """An executor that reads and hashes row groups with `threads` threads of this process."""

    def blocks(groups: list[RowGroup]) -> Iterator[Block]:
        return thread_blocks(groups, spec, threads)

    return blocks


class Feed:
    """Batches for one rank. groups: {split: row groups} (train, and valid / test when the
    data has them); blocks: the executor that reads and hashes a list of row groups."""

    def __init__(
        self,
        groups: dict[str, list[RowGroup]],
        world: World,
        blocks: Blocks,
        *,
        batch_size: int,
        eval_batch_size: int,
        shuffle_rows: int,
        seed: int,
        holdout: int = 0,
    ) -> None:
        """holdout: keep one train row in `holdout` (by a hash of its row number) out of
        training, readable as the split "holdout" (0: none)."""
        self.groups, self.world, self.blocks = groups, world, blocks
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.shuffle_rows, self.seed, self.holdout = shuffle_rows, seed, holdout

    def _held(self, block: Block) -> np.ndarray:
        """(B,) True for the block's held-out rows."""
        h = block["row"].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return (h >> np.uint64(40)) % np.uint64(self.holdout) == 0

    def _split_blocks(self, blocks: Iterator[Block], held: bool) -> Iterator[Block]:
        for block in blocks:
            keep = self._held(block) == held
            yield block if keep.all() else {k: v[keep] for k, v in block.items()}

    def rows(self, split: str) -> int:
        """Rows of `split` over all ranks (0 when the data has no such split)."""
        return sum(g.rows for g in self.groups.get(split, ()))

    def has(self, split: str) -> bool:
        return self.rows(split) > 0

    def train(self, epoch: int, skip: np.ndarray | None = None) -> Iterator[Batch]:
        """This rank's training batches of `epoch` (a new row-group order and shuffle each
        epoch), without the rows in `skip`."""
        w = self.world
        mine = rank_groups(self.groups["train"], w.rank, w.size, seed=self.seed, epoch=epoch)
        blocks = self.blocks(mine)
        if self.holdout:
            blocks = self._split_blocks(blocks, held=False)
        for arrays in rebatch(
            blocks,
            self.batch_size,
            shuffle_rows=self.shuffle_rows,
            seed=[self.seed, epoch, w.rank],
            skip=skip,
        ):
            yield from_numpy(arrays)

    def evaluate(self, split: str) -> Iterator[Batch] | None:
        """This rank's share of `split` in file order, or None when the data has no such split
        ("holdout": the train rows kept out of training, when a holdout is set)."""
        if split == "holdout":
            return self._eval("train", held=True) if self.holdout else None
        if not self.has(split):
            return None
        return self._eval(split)

    def _eval(self, split: str, held: bool = False) -> Iterator[Batch]:
        mine = rank_groups(self.groups[split], self.world.rank, self.world.size)
        blocks = self._split_blocks(self.blocks(mine), held=True) if held else self.blocks(mine)
        for arrays in rebatch(blocks, self.eval_batch_size):
            yield from_numpy(arrays)

    def describe(self) -> dict[str, Any]:
        return {s: {"rows": self.rows(s), "row_groups": len(g)} for s, g in self.groups.items()}
