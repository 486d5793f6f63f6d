"""A distributed sampler that can resume mid-epoch, on the same or a different number of ranks."""

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Each epoch, one global order of the dataset (a seeded permutation, or ``0..N-1``),
    padded to a multiple of ``num_replicas`` by repeating its head; rank ``r`` takes
    positions ``r, r + R, r + 2R, ...`` after the first ``consumed`` positions.

    Resuming with ``consumed`` = the number of samples the whole job had taken in the
    epoch continues exactly where it stopped, whatever ``num_replicas`` is now (the
    global order does not depend on it): no sample is skipped or repeated.

    Args:
        dataset_len: number of samples.
        num_replicas: number of data-parallel ranks.
        rank: this rank's index among them.
        shuffle: permute each epoch (seeded by ``seed + epoch``).
        seed: base seed, the same on every rank.
    """

    def __init__(self, dataset_len: int, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        self.dataset_len, self.num_replicas, self.rank = dataset_len, num_replicas, rank
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.consumed = 0, 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        """Start ``epoch`` after its first ``consumed`` samples (summed over all ranks)."""
        self.epoch, self.consumed = epoch, consumed

    def _global_order(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            order = order.tolist()
        else:
            order = list(range(self.dataset_len))
        pad = -len(order) % self.num_replicas
        return order + (order * (pad // len(order) + 1))[:pad]

    def __iter__(self) -> Iterator[int]:
        return iter(self._global_order()[self.consumed + self.rank :: self.num_replicas])

    def __len__(self) -> int:
        remaining = -(-self.dataset_len // self.num_replicas) * self.num_replicas - self.consumed
        return max(0, -(-(remaining - self.rank) // self.num_replicas))
