"""One job over several processes started by ``torchrun``: the process group, each process's device, and the
gathering of per-process results. Without an initialized process group every function acts as for a single
process (rank 0 of 1), so the same code serves one process and many.

The bundles' ``multi_gpu_*.yaml`` configs call these. Training shares out its labeled draws with
:class:`common.sampling.DistributedBalancedModalitySampler` and the rest with MONAI's padded ``DistributedSampler``;
inference shards with :class:`ShardSampler`, which never repeats an item (an image segmented twice would be written
twice) and accepts fewer items than processes; validation in training shards with :func:`validation_sampler`, so
that each image counts once in the mean F1. :func:`torchrun_launcher` starts such a job from a tool.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist
from monai.data import DistributedSampler
from torch.utils.data import Sampler

__all__ = [
    "start_process_group",
    "end_process_group",
    "local_device",
    "rank_and_world_size",
    "gather_lists",
    "ShardSampler",
    "validation_sampler",
    "free_port",
    "torchrun_launcher",
]


def start_process_group() -> None:
    """Join the process group torchrun describes (its environment variables): NCCL when CUDA is available, else
    gloo. Also makes this process's GPU the current one. Does nothing when the group already exists."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def end_process_group() -> None:
    """Leave the process group, if there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` (this process's GPU on its machine, so several machines work too), or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")


def rank_and_world_size() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_lists(local: list[Any]) -> list[Any]:
    """Every process's ``local`` list (picklable items), concatenated in rank order, on every process.

    A collective: every process of the group must call it. Without a group it returns a copy of ``local``.
    """
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return list(local)
    gathered: list[list[Any] | None] = [None] * world_size
    dist.all_gather_object(gathered, list(local))
    return [item for share in gathered for item in share or []]


class ShardSampler(Sampler[int]):
    """This process's share of a dataset, in order: indices ``rank, rank + N, rank + 2N, ...`` of ``N`` processes.

    Every index belongs to exactly one process and none is repeated, so shares differ by at most one item and
    a process may get none (more processes than items). Unlike MONAI's ``DistributedSampler(even_divisible=False)``
    it does not refuse a dataset smaller than the group.

    Args:
        dataset: anything with a length.
        rank, world_size: default: this process's, from the process group ((0, 1) without one).
    """

    def __init__(self, dataset, rank: int | None = None, world_size: int | None = None):
        default_rank, default_world_size = rank_and_world_size()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world_size if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not one of {self.world_size} processes")
        self.length = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def validation_sampler(dataset, rank: int | None = None, world_size: int | None = None) -> Sampler[int]:
    """This process's share of a validation set whose per-image scores are summed over the processes.

    With at least one image per process: :class:`ShardSampler`, every image once, so the mean over the processes'
    sums is the mean over the images (MONAI's padded ``DistributedSampler`` repeats the first images to even the
    shares: with 7 images on 2 processes the first counted twice). With fewer images than processes the shares are
    padded that way, since an evaluator cannot run on an empty share, and the repeated images count twice.

    Args:
        dataset: the validation dataset (anything with a length).
        rank, world_size: default: this process's, from the process group ((0, 1) without one).
    """
    shard = ShardSampler(dataset, rank, world_size)
    if len(dataset) >= shard.world_size:
        return shard
    return DistributedSampler(dataset, even_divisible=True, num_replicas=shard.world_size, rank=shard.rank, shuffle=False)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous or a local server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_launcher(processes: int) -> list[str]:
    """The command that starts ``processes`` copies of a program on this machine under torchrun, its rendezvous on
    a free local port; the program (a script, or ``-m module``) and its arguments follow."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
