"""Deterministic, resumable, rank-sharded sampling.

The sampler yields ``(epoch, index)`` pairs. ``SegDataset`` seeds each sample's augmentation from
``(seed, epoch, index)``, so the images a run sees depend only on the seed and the epoch: the same on
any number of workers, identical after a resume, and split across ranks without overlap.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled (training) or ordered (evaluation) indices for one rank.

    Training (``pad=True``): the epoch's permutation is padded by wrapping so every rank gets the same
    number of samples (DDP needs equal step counts). Evaluation (``pad=False``): rank r takes indices
    ``r, r + W, ...`` with no duplicates, so confusion matrices summed over ranks count each image once.
    """

    def __init__(
        self,
        length: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
        if length <= 0:
            raise ValueError("EpochSampler needs a non-empty dataset")
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        self.skip = 0  # samples of this rank's shard to skip once (mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def epoch_order(self) -> list[int]:
        """All indices of this epoch, before sharding."""
        if not self.shuffle:
            return list(range(self.length))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.length, generator=gen).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order()
        if self.pad and self.world_size > 1:
            total = -(-len(order) // self.world_size) * self.world_size
            order = (order * (total // len(order) + 1))[:total]
        for i in order[self.rank :: self.world_size][self.skip :]:
            yield (self.epoch, i)

    def __len__(self) -> int:
        if self.pad:
            return -(-self.length // self.world_size)
        return len(range(self.rank, self.length, self.world_size))
