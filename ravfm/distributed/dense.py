"""Dense (replicated) parameters across ranks: gradient averaging, and their optimizers.

Tables of kind sparse or rows hold their rows in buffers, so they never appear here; a
PlainTable's weight is an ordinary parameter and is averaged like one.

`DenseOptimizer` (adam | adagrad | sgd) steps the few dense parameters (biases, VFM priors)
with torch.optim's update rules, tested against them. torch.optim is not used itself: its
first optimizer imports torch._dynamo, about two seconds of every run's start-up.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ravfm.distributed.world import World

__all__ = ["all_reduce_dense_grads", "DenseOptimizer"]


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


class DenseOptimizer:
    """Adam, Adagrad or SGD over `params`, as torch.optim.Adam / Adagrad / SGD (no weight
    decay, no amsgrad, lr_decay 0). `param_groups[0]["lr"]` may change between steps;
    `state_dict()` is {name: tensor} (safetensors-ready), `load_state_dict` its inverse."""

    def __init__(
        self,
        params: list[nn.Parameter],
        kind: str,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        initial_accumulator: float = 0.0,
    ) -> None:
        if kind not in ("adam", "adagrad", "sgd"):
            raise ValueError(f"dense optimizer {kind!r} is not adam, adagrad or sgd")
        self.params, self.kind = list(params), kind
        self.param_groups = [{"lr": float(lr), "params": self.params}]
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        zeros = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.state: dict[str, list[Tensor]] = {}
        if kind == "adam":  # a step count per parameter: one without a gradient does not step
            self.state = {
                "exp_avg": zeros,
                "exp_avg_sq": [z.clone() for z in zeros],
                "step": [torch.zeros(1, dtype=torch.float64) for _ in self.params],
            }
        elif kind == "adagrad":
            self.state = {"sum": [torch.full_like(p, initial_accumulator) for p in self.params]}

    @torch.no_grad()
    def step(self) -> None:
        lr = self.param_groups[0]["lr"]
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if self.kind == "sgd":
                p.add_(g, alpha=-lr)
            elif self.kind == "adagrad":
                s = self.state["sum"][i].addcmul_(g, g)
                p.addcdiv_(g, s.sqrt().add_(self.eps), value=-lr)
            else:
                self._adam(p, g, i, lr)

    def _adam(self, p: Tensor, g: Tensor, i: int, lr: float) -> None:
        b1, b2 = self.betas
        t = int(self.state["step"][i].add_(1).item())
        m = self.state["exp_avg"][i].lerp_(g, 1 - b1)
        v = self.state["exp_avg_sq"][i].mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
        p.addcdiv_(m, denom, value=-lr / bc1)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for name, tensors in self.state.items():
            for i, t in enumerate(tensors):
                out[f"{name}/{i}"] = t.detach().cpu().contiguous()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        want = {f"{n}/{i}" for n, ts in self.state.items() for i in range(len(ts))}
        if set(state) != want:
            from ravfm.errors import UserError

            raise UserError(
                "checkpoint dense optimizer state does not fit (another optim.dense or "
                "model); resume with the checkpoint's config"
            )
        for name, tensors in self.state.items():
            for i, t in enumerate(tensors):
                t.copy_(state[f"{name}/{i}"].to(t))
