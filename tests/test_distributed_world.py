"""World without a process group: every collective is the identity on one rank."""

from __future__ import annotations

import pytest
import torch

from ravfm.distributed.dense import all_reduce_dense_grads
from ravfm.distributed.world import World


def test_single_world_collectives_are_local_copies():
    w = World.single()
    assert (w.rank, w.size, w.backend, w.distributed) == (0, 1, None, False)
    t = torch.tensor([1.0, 2.0])
    assert w.all_reduce_(t, op="max") is t and t.tolist() == [1.0, 2.0]
    assert w.exchange(torch.arange(3), [3], [3]).tolist() == [0, 1, 2]
    assert w.exchange_counts(torch.tensor([4])).tolist() == [4]
    assert w.all_gather_v(torch.arange(2)).tolist() == [0, 1]
    w.barrier()


def test_from_env_without_a_process_group_is_single():
    assert World.from_env() == World.single()
    assert World.from_env("cpu").device == torch.device("cpu")


def test_rank_outside_the_world_is_rejected():
    with pytest.raises(ValueError):
        World(2, 2)


def test_dense_grads_are_untouched_on_one_rank():
    p = torch.nn.Linear(2, 1)
    p.weight.grad = torch.ones(1, 2)
    all_reduce_dense_grads(p, World.single())
    assert p.weight.grad.tolist() == [[1.0, 1.0]] and p.bias.grad is None
