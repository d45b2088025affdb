"""An in-memory batch iterator and the plain batch samplers.

The loader only indexes uint8 tensors; augmentation happens after the batch reaches its device
(``LightningDataModule.on_after_batch_transfer``), so the loader never starves the model.
Batch order is a pure function of (seed, increment, epoch, rank): a resumed run sees the same batches.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import torch

from src.utils.seeding import stream_generator


def epoch_order(n: int, seed: int, increment: int | None, epoch: int, length: int | None = None) -> torch.Tensor:
    """The epoch's shuffled order of ``n`` images, shared by every rank: one permutation, or, when ``length`` asks
    for more, further permutations of the same stream appended, cut to ``length``."""
    g = stream_generator(seed, "batches", increment, epoch)
    length = n if length is None else length
    return torch.cat([torch.randperm(n, generator=g) for _ in range(max(math.ceil(length / n), 1))])[:length]


class RandomBatchSampler:
    """Shuffled batches; each DDP rank takes a disjoint stride of the same permutation."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, increment: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle, self.drop_last = n, batch_size, seed, shuffle, drop_last
        self.rank, self.world_size, self.increment = rank, world_size, increment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_indices(self) -> torch.Tensor:
        if not self.shuffle:
            order = torch.arange(self.n)
        else:  # one permutation shared by all ranks (no rank in the key), each rank takes its stride
            order = epoch_order(self.n, self.seed, self.increment, self.epoch)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        per_rank = math.ceil(self.n / self.world_size) if self.shuffle else len(range(self.rank, self.n, self.world_size))
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        idx = self._my_indices()
        for start in range(0, len(idx), self.batch_size):
            batch = idx[start : start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield batch


class CappedBatchSampler:
    """The first ``max_batches`` batches of ``inner``'s epoch: an epoch that trains on fewer images than its training
    set holds (each epoch's draw is ``inner``'s own, keyed by its epoch), e.g. joint at a memory strategy's budget."""

    def __init__(self, inner, max_batches: int):
        if max_batches < 1:
            raise ValueError(f"an epoch needs at least one batch, got max_batches={max_batches}")
        self.inner, self.max_batches = inner, max_batches

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    def __len__(self) -> int:
        return min(len(self.inner), self.max_batches)

    def __iter__(self):
        return itertools.islice(self.inner, self.max_batches)


class InMemoryLoader:
    """Yields (uint8 images, labels, positions) for each index batch its batch sampler draws."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_sampler,
                 epoch_fn: Callable[[], int] | None = None):
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images, self.labels, self.batch_sampler = images, labels, batch_sampler
        self.epoch_fn = epoch_fn

    def to(self, device) -> InMemoryLoader:
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        if self.epoch_fn is not None and hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(self.epoch_fn())
        on_cpu = self.images.device.type == "cpu"
        images_np = self.images.numpy() if on_cpu else None
        for idx in self.batch_sampler:
            if on_cpu:  # numpy's row gather is several times faster than torch advanced indexing on uint8
                yield torch.from_numpy(images_np[idx.numpy()]), self.labels[idx], idx
            else:
                dev_idx = idx.to(self.images.device)
                yield self.images[dev_idx], self.labels[dev_idx], idx
