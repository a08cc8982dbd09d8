"""Data-parallel training with PyTorch's own engine (``torch.distributed`` + DDP, launched
by ``torchrun``): process groups, sharded sampling, metric reduction, rank checks.

``--batch-size`` is per process: the global batch is ``world_size x batch_size``. The LR is
never scaled silently; the log states the global batch so you can scale ``--lr`` yourself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
    return info


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class ShardedShuffle(torch.utils.data.Sampler[int]):
    """Each global batch of ``world x batch`` indices from one shared permutation, split so
    rank r gets the r-th slice: the same samples per optimizer step as one process with
    the global batch, and every rank the same number of steps."""

    def __init__(self, n: int, generator: torch.Generator, info: DistInfo, batch_size: int) -> None:
        self.n, self.generator, self.info, self.batch = n, generator, info, batch_size
        self.steps = n // (batch_size * info.world)

    def __len__(self) -> int:
        return self.steps * self.batch

    def __iter__(self) -> Iterator[int]:
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        span = self.batch * self.info.world
        for k in range(self.steps):
            start = k * span + self.info.rank * self.batch
            yield from perm[start:start + self.batch]


def eval_shard(n: int, info: DistInfo) -> list[int]:
    """Rank r evaluates samples r, r + world, ...: each sample exactly once, no padding."""
    return list(range(info.rank, n, info.world))


def _comm_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo, CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: Sequence[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_cat(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's tensor (rank order), sizes may differ."""
    if not info.enabled:
        return tensor
    parts: list = [None] * info.world
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def unshard_order(n: int, info: DistInfo) -> torch.Tensor:
    """Positions that put rank-ordered gathered results back in dataset order."""
    shards = torch.cat([torch.arange(r, n, info.world) for r in range(info.world)])
    return torch.argsort(shards)


def params_in_sync(model: nn.Module, info: DistInfo) -> bool:
    """Do all ranks hold the same parameters? (exact checksums, all-gathered)"""
    if not info.enabled:
        return True
    flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    sums = torch.stack([flat.sum(), (flat * flat).sum(), flat[::7].sum(), flat.abs().max()]).to(_comm_device())
    gathered = [torch.zeros_like(sums) for _ in range(info.world)]
    dist.all_gather(gathered, sums)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def launch(nproc: int, argv: Sequence[str]) -> int:
    """``layerwise fit --nproc N``: start torchrun on this node with the same arguments."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "layerwise", *argv]
    return subprocess.call(cmd)
