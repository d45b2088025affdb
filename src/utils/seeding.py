"""One place that turns the run's ``seed`` into the seed of each random stream.

Every stream (augmentation and dropout, batch order, neighbourhood sampling, k-means, exemplar
selection, replay draws) is keyed by (seed, stream, increment, epoch, rank), so no two increments or epochs replay
the same draws, and a resumed run draws exactly what the uninterrupted one would have drawn."""
from __future__ import annotations

import zlib

import numpy as np
import torch

STREAMS = ("global", "batches", "kmeans", "exemplars", "replay")


def stream_seed(seed: int, stream: str, increment: int | None = 0, epoch: int = 0, rank: int = 0,
                item: int | None = None) -> int:
    """A 63-bit seed for one stream; ``increment=None`` (a run that is not continual) counts as 0.
    ``item`` separates draws made for several things at one step (e.g. each class's exemplars)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; expected one of {STREAMS}")
    key = [int(seed) & 0xFFFFFFFF, zlib.crc32(stream.encode()), int(increment or 0), int(epoch), int(rank)]
    if item is not None:  # appended only when given, so the other streams keep their seeds
        key.append(int(item))
    high, low = (int(w) for w in np.random.SeedSequence(key).generate_state(2, dtype=np.uint32))
    return ((high << 32) | low) & (2**63 - 1)


def stream_generator(seed: int, stream: str, increment: int | None = 0, epoch: int = 0, rank: int = 0,
                     item: int | None = None) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, stream, increment, epoch, rank, item))
