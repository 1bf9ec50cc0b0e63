"""DistributedDataParallel helpers for ``afmp train`` under torchrun.

    torchrun --nproc_per_node=N -m afmp.commands.train --dataset cifar100 --batch-size 128 ...

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


def train_sampler(dataset, env: DistEnv, seed: int, group_batch: int | None = None) -> Sampler[int]:
    """Shuffled shards whose union, batch by batch, is the one-process batch; with
    ``group_batch`` (the global batch), a LengthGroupedSampler over ``dataset.lengths()``.

    Every rank draws the same permutation (``seed + epoch``, after ``set_epoch``) and
    takes every world_size-th index, so the k-th local batches of all ranks together
    hold exactly the k-th global batch a single process would draw (when the training
    set divides into global batches; otherwise the sampler pads the last one by repeats).
    """
    if group_batch is not None:
        return LengthGroupedSampler(dataset.lengths(), group_batch, env, seed)
    return DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed, drop_last=False
    )


class LengthGroupedSampler(Sampler[int]):
    """train_sampler's shuffle, with each global batch made of examples of similar length.

    Each epoch draws a permutation (``seed + epoch``), cuts it into pools of ``pool`` global
    batches, sorts every pool by length, cuts it into global batches and shuffles their order
    (the short last batch stays last). Padded to its longest row, a batch is then about as long
    as its examples: on ListOps of lengths 21-99 a row holds 44 tokens on average instead of
    96, so an epoch computes about half as much, for batches that are less random (what Hugging
    Face calls group_by_length). Sharded as train_sampler is, so the k-th local batches of all
    ranks together hold the k-th global batch.
    """

    def __init__(self, lengths, global_batch: int, env: DistEnv, seed: int, pool: int = 50):
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        if self.lengths.ndim != 1 or global_batch < 1 or pool < 1:
            raise ValueError(
                f"expected one length per example, global_batch >= 1 and pool >= 1; got lengths of "
                f"shape {tuple(self.lengths.shape)}, {global_batch} and {pool}"
            )
        self.global_batch, self.pool, self.env, self.seed, self.epoch = global_batch, pool, env, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.env.world_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for pool in torch.randperm(len(self.lengths), generator=g).split(self.global_batch * self.pool):
            longest_first = torch.sort(self.lengths[pool], descending=True, stable=True).indices
            batches += pool[longest_first].split(self.global_batch)
        # Only the last pool can leave a short batch, its last: it stays at the end.
        short = [batches.pop()] if batches and len(batches[-1]) < self.global_batch else []
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g)] + short
        indices = torch.cat(batches).tolist() if batches else []
        indices += indices[: -len(indices) % self.env.world_size]  # as DistributedSampler pads
        return iter(indices[self.env.rank :: self.env.world_size])


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
