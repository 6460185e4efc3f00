"""Many processes, one training loop (nanoGPT-style): ``torchrun`` or ``accelerate launch`` start N
copies of ``python -m vlbench train`` and set WORLD_SIZE / RANK / LOCAL_RANK; without them this is
one process and every helper here is a no-op. Rank 0 does everything that writes (MLflow, files,
progress bars); all ranks train.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, items: list) -> list:
        """This rank's contiguous part of ``items``: the ranks' parts, in rank order, are ``items``."""
        return split(items, self.world_size)[self.rank]


def split(items: list, parts: int) -> list[list]:
    """``items`` cut into ``parts`` contiguous runs whose lengths differ by at most one."""
    n = len(items)
    return [items[k * n // parts : (k + 1) * n // parts] for k in range(parts)]


def from_env() -> Ranks:
    """The launcher's view of this process (one process when no launcher set WORLD_SIZE)."""
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def setup(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group when launched as many processes: NCCL on CUDA (each process on the
    GPU of its LOCAL_RANK), gloo on CPU. -> the device this process trains on."""
    if not ranks.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order, with gradients flowing back to
    each rank's own rows. Identity on one process.

    Why no rescaling is needed: every rank computes the same global loss from the gathered rows;
    the backward sums all ranks' gradients for this rank's rows (N x the one-process gradient), and
    DDP then averages parameter gradients over the N ranks: exactly the one-process gradients."""
    if not active():
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API (torch 2.14): keep it, quietly
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)
        return torch.cat(all_gather(x), 0)


def mean(value: float, device: torch.device) -> float:
    """The mean of a number over all ranks (for logging a loss of the whole global batch)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any: ranks must agree to stop at the same step, or the
    ones that go on wait forever for the ones that left."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if active():
        dist.barrier()
