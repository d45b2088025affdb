"""A reservoir buffer (Vitter's algorithm R): after n insertions, each of the n examples is held with
probability size / n, without knowing n in advance. DER++ keeps (image, label, logits at insertion).

The buffer lives on the training device and every insertion decision is drawn on the host from a
seeded CPU generator, so storing a batch never waits for the device."""
from __future__ import annotations

import numpy as np
import torch


class ReservoirBuffer:
    def __init__(self, size: int, generator: torch.Generator | None = None):
        if size < 1:
            raise ValueError(f"strategy.buffer_size must be >= 1 for a reservoir buffer, got {size}")
        self.size = size
        self.generator = generator or torch.Generator().manual_seed(0)
        self.seen = 0  # examples offered so far
        self.images: torch.Tensor | None = None  # [size, ...] uint8
        self.labels: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return min(self.seen, self.size)

    def slots_for(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For ``n`` newly offered examples: which of them are kept (positions in the batch) and the slot
        each one takes. While the buffer fills, every example takes the next slot; afterwards example i
        (the seen+i-th overall) draws j uniform in [0, seen+i] and replaces slot j if j < size."""
        # Host arithmetic in numpy: these are decisions about the batch, not device values, and keeping them
        # out of torch keeps the step free of tensor operators that would read the device (tests/test_host_sync.py).
        order = np.arange(self.seen, self.seen + n)
        draws = np.floor(torch.rand(n, generator=self.generator, dtype=torch.float64).numpy() * (order + 1))
        slot = np.where(order < self.size, order, draws.astype(np.int64))
        kept_pos = np.flatnonzero(slot < self.size)
        kept_slot = slot[kept_pos]
        # a later example of the same batch that takes the same slot wins, as in the sequential algorithm
        last = {int(s): i for i, s in enumerate(kept_slot)}
        chosen = np.array(sorted(last.values()), dtype=np.int64)
        return torch.from_numpy(kept_pos[chosen]), torch.from_numpy(kept_slot[chosen])

    def add(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        n = len(images)
        if self.images is None:
            self.images = torch.zeros((self.size, *images.shape[1:]), dtype=images.dtype, device=images.device)
            self.labels = torch.zeros(self.size, dtype=labels.dtype, device=labels.device)
            self.logits = torch.zeros((self.size, *logits.shape[1:]), dtype=logits.dtype, device=logits.device)
        positions, slots = self.slots_for(n)
        self.seen += n
        if len(positions) == 0:
            return
        device = self.images.device
        positions, slots = positions.to(device, non_blocking=True), slots.to(device, non_blocking=True)
        self.images[slots] = images[positions]
        self.labels[slots] = labels[positions]
        self.logits[slots] = logits.detach()[positions].to(self.logits.dtype)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` stored examples drawn without replacement (all of them when fewer are held)."""
        pick = torch.randperm(len(self), generator=self.generator)[:n].to(self.images.device, non_blocking=True)
        return self.images[pick], self.labels[pick], self.logits[pick]

    def state_dict(self) -> dict:
        cpu = lambda v: None if v is None else v.cpu()  # noqa: E731
        return {"size": self.size, "seen": self.seen, "images": cpu(self.images), "labels": cpu(self.labels),
                "logits": cpu(self.logits), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.seen = state["size"], state["seen"]
        self.images, self.labels, self.logits = state["images"], state["labels"], state["logits"]
        self.generator.set_state(state["generator"])
