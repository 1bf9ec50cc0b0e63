"""DistributedDataParallel helpers for ``afmp train`` under torchrun.

    torchrun --nproc_per_node=N -m afmp.train --dataset cifar100 --batch-size 128 ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; ``init()`` reads them and joins the
process group (NCCL on CUDA, gloo on the CPU). Without them everything here is a
no-op for a single process, so the trainer has one code path. ``--batch-size`` stays
the global batch: each of the N ranks loads batch_size / N examples of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_from_environ() -> DistEnv:
    """The ranks torchrun put in the environment (a single process when it did not)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the process group when launched by torchrun; returns the env and this rank's device."""
    env = env_from_environ()
    if not env.enabled:
        return env, device
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return env, device


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def local_batch_size(global_batch: int, env: DistEnv) -> int:
    if global_batch % env.world_size:
        raise ValueError(
            f"--batch-size {global_batch} is the global batch and must divide evenly over "
            f"{env.world_size} processes"
        )
    return global_batch // env.world_size


def train_sampler(dataset, env: DistEnv, seed: int) -> DistributedSampler:
    """Shuffled shards whose union, batch by batch, is the one-process batch.

    Every rank draws the same permutation (``seed + epoch``, after ``set_epoch``) and
    takes every world_size-th index, so the k-th local batches of all ranks together
    hold exactly the k-th global batch a single process would draw (when the training
    set divides into global batches; otherwise the sampler pads the last one by repeats).
    """
    return DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed, drop_last=False
    )


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... in order, without padding: every example is evaluated once."""

    def __init__(self, dataset, env: DistEnv):
        self.indices = range(env.rank, len(dataset), env.world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum each number over all ranks (float64, so example counts stay exact)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def wrap(model: torch.nn.Module, env: DistEnv, device: torch.device) -> torch.nn.Module:
    """DDP around ``model`` when distributed (the weights start equal: DDP broadcasts rank 0's)."""
    if not env.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        # Some configurations leave parameters without gradient, always the same ones (the
        # top-down maps without the top-down pass): a static graph allows that at no cost.
        static_graph=True,
    )
