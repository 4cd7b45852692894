"""Dense (replicated) parameters across ranks: gradient averaging and clipping.

Tables of kind sparse or rows hold their rows in buffers, so they never appear here; a
PlainTable's weight is an ordinary parameter and is averaged like one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ravfm.distributed.world import World

__all__ = ["all_reduce_dense_grads", "clip_grad_norm"]


@torch.no_grad()
def all_reduce_dense_grads(model: nn.Module, world: World) -> None:
    """Average every parameter's .grad over the ranks (one flat all-reduce per dtype).

    A parameter without a gradient on this rank contributes zeros, so every rank joins the same
    collective whatever its batch touched; one that has no gradient on any rank stays None."""
    if world.size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype in sorted(by_dtype, key=str):
        group = by_dtype[dtype]
        has = torch.tensor([p.grad is not None for p in group], dtype=dtype)
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
            + [has.to(group[0].device)]
        ).to(world.device)
        world.all_reduce_(flat)
        flat[: -len(group)].div_(world.size)
        offset = 0
        for p, anyone in zip(group, flat[-len(group) :].tolist()):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.device) if anyone else None
            offset += n


def clip_grad_norm(params: list[Tensor], max_norm: float) -> Tensor:
    """Scale the dense gradients so their global L2 norm is at most max_norm; returns the norm
    before clipping. Call it after all_reduce_dense_grads: the grads are then equal on all ranks."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
