"""The world one rank lives in: rank, size, device, backend, and the collectives ravfm uses.

Every collective also works for W = 1 without a process group (it is then a local copy), so the
same code runs in one process, under gloo on CPU and under NCCL on GPU. Rule 7 of STYLE.md:
every rank calls every collective, in the same order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["World", "free_port"]

_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX", "prod": "PRODUCT"}


@dataclass(frozen=True)
class World:
    """rank in [0, size); device where this rank's tensors live; backend gloo | nccl | None."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a world of size {self.size}")
        object.__setattr__(self, "device", torch.device(self.device))

    @staticmethod
    def single(device: str | torch.device = "cpu") -> World:
        """One process, no process group."""
        return World(0, 1, torch.device(device), None)

    @staticmethod
    def from_env(device: str | torch.device | None = None) -> World:
        """The initialised torch.distributed group (if any), else a single process.

        device: None picks cuda:LOCAL_RANK under NCCL and cpu otherwise."""
        if not (dist.is_available() and dist.is_initialized()):
            return World.single(device or "cpu")
        backend = str(dist.get_backend())
        if device is None:
            if backend == "nccl":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            else:
                device = torch.device("cpu")
        return World(dist.get_rank(), dist.get_world_size(), torch.device(device), backend)

    @staticmethod
    def init(rank: int, size: int, init_method: str, device: str | torch.device = "cpu") -> World:
        """Initialise the default process group (gloo on CPU, NCCL on CUDA) and return the world."""
        device = torch.device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if size > 1 and not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
        return World(rank, size, device, backend if size > 1 else None)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_reduce_(self, t: Tensor, op: str = "sum") -> Tensor:
        """In-place all-reduce of `t` (any shape) with op sum | min | max | prod; returns t."""
        if self.size > 1:
            dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]))
        return t

    def all_to_all_single(
        self,
        output: Tensor,
        input: Tensor,
        output_split_sizes: list[int],
        input_split_sizes: list[int],
    ) -> Tensor:
        """Rows input[sum(in[:j]) : sum(in[:j+1])] go to rank j; output is filled with what each
        rank sent here, in rank order. input (n, ...), output (m, ...); returns output."""
        if self.size == 1:
            output.copy_(input)
        else:
            dist.all_to_all_single(
                output, input.contiguous(), output_split_sizes, input_split_sizes
            )
        return output

    def exchange(self, input: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        """all_to_all_single with a freshly allocated output of sum(recv_counts) rows."""
        out = input.new_empty((sum(recv_counts), *input.shape[1:]))
        return self.all_to_all_single(out, input, recv_counts, send_counts)

    def exchange_counts(self, send_counts: Tensor) -> Tensor:
        """send_counts (W,) int64: rows this rank sends to each rank -> (W,) rows it receives."""
        if self.size == 1:
            return send_counts.clone()
        out = torch.empty_like(send_counts)
        dist.all_to_all_single(out, send_counts.contiguous())
        return out

    def all_gather_v(self, t: Tensor) -> Tensor:
        """Concatenate every rank's t (n_r, ...) in rank order -> (sum n_r, ...); n_r may differ."""
        if self.size == 1:
            return t
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        counts = [torch.zeros_like(n) for _ in range(self.size)]
        dist.all_gather(counts, n)
        sizes = [int(c.item()) for c in counts]
        width = max(sizes)
        padded = t.new_zeros((width, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def gather_objects(self, obj: object) -> list:
        """Every rank's picklable `obj`, in rank order (small things: file digests, flags)."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        """Rank `src`'s picklable `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for local process groups)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
