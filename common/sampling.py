"""Sampling that keeps rare modalities visible in a training pool dominated by one of them."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch
from torch.utils.data import DistributedSampler, WeightedRandomSampler

__all__ = ["modality_weights", "BalancedModalitySampler", "DistributedBalancedModalitySampler"]


def modality_weights(items: Sequence[dict], power: float = 0.5, key: str = "modality") -> torch.Tensor:
    """Per-item sampling weights so that a modality with n images is drawn in proportion to ``n ** power``.

    ``power`` 1 is plain uniform sampling over images, 0 gives every modality the same share, and 0.5 (the
    default) the square root: a modality 40x rarer is drawn 6x less often instead of 40x. Items without the key
    form one group of their own.

    Args:
        items: datalist entries (dicts), e.g. ``datalist["training"]``.
        power: exponent in [0, 1].
        key: the entry's modality field.

    Returns:
        (len(items),) float64 weights summing to 1.
    """
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"power must be in [0, 1], got {power}")
    if not items:
        raise ValueError("no items to sample from")
    groups = [item.get(key, "") for item in items]
    counts = Counter(groups)
    weights = torch.tensor([counts[group] ** (power - 1.0) for group in groups], dtype=torch.float64)
    return weights / weights.sum()


class BalancedModalitySampler(WeightedRandomSampler):
    """``WeightedRandomSampler`` over datalist entries with :func:`modality_weights`; an epoch draws
    ``num_samples`` entries (default: as many as there are) with replacement.

    Args:
        items: datalist entries.
        power: see :func:`modality_weights`.
        num_samples: draws per epoch; None = len(items).
    """

    def __init__(self, items: Sequence[dict], power: float = 0.5, num_samples: int | None = None):
        super().__init__(modality_weights(items, power), num_samples or len(items), replacement=True)


class DistributedBalancedModalitySampler(DistributedSampler):
    """:class:`BalancedModalitySampler` for a multi-process run: one epoch of balanced draws shared out among the
    processes, so N processes together see what one process would (the same number of draws, the same modality
    shares) instead of each drawing its share uniformly, as a plain ``DistributedSampler`` would.

    Every rank draws the same ``num_samples`` entries (rounded up to a multiple of the ranks) from a generator seeded
    with ``seed + epoch`` and keeps every ``num_replicas``-th from position ``rank`` on; MONAI's trainers call
    ``set_epoch`` at each epoch, which changes the draws.

    Args:
        items: datalist entries, in the dataset's order.
        power: see :func:`modality_weights`.
        num_samples: draws per epoch of all ranks together; None = len(items).
        num_replicas: the number of ranks; None = the process group's size.
        rank: this process's rank; None = the process group's.
        seed: the same on every rank.
    """

    def __init__(self, items: Sequence[dict], power: float = 0.5, num_samples: int | None = None,
                 num_replicas: int | None = None, rank: int | None = None, seed: int = 0):
        super().__init__(items, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = modality_weights(items, power)
        self.num_samples = math.ceil((num_samples or len(items)) / self.num_replicas)  # per rank
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)
        return iter(drawn[self.rank : self.total_size : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
