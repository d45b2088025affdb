"""A class-balanced exemplar memory of fixed total size, chosen by herding in embedding space (or at
random). Memory images join the training set, so they are clustered with the new data and their
clusters act as impostors in the neighbourhood batches."""
from __future__ import annotations

import torch

from src.continual.strategies.base import Strategy
from src.models.embed import embed_images
from src.utils.seeding import stream_generator


def herding(emb: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL herding: greedily pick points whose running mean stays closest to the class mean.
    Returns positions in selection order, so any prefix is itself a herded memory."""
    mu = emb.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(len(emb), dtype=torch.bool)
    for k in range(1, min(m, len(emb)) + 1):
        candidate = (running[None] + emb) / k
        dist = (candidate - mu[None]).pow(2).sum(1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running += emb[i]
    return torch.tensor(chosen, dtype=torch.long)


class Replay(Strategy):
    name = "replay"

    def __init__(self, buffer_size: int = 500, selection: str = "herding", seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if buffer_size < 0:
            raise ValueError(f"strategy.buffer_size must be >= 0, got {buffer_size}")
        if selection not in ("herding", "random"):
            raise ValueError(f"strategy.selection must be herding or random, got {selection!r}")
        self.buffer_size, self.selection, self.seed = buffer_size, selection, seed
        self.memory: dict[int, torch.Tensor] = {}  # class -> indices into the CIFAR train array, best first

    def begin_task(self, t, module, datamodule):
        super().begin_task(t, module, datamodule)
        datamodule.memory_indices = self.memory_indices()

    def memory_indices(self) -> torch.Tensor:
        if not self.memory:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([self.memory[c] for c in sorted(self.memory)])

    def per_class(self, num_classes: int) -> int:
        return self.buffer_size // max(num_classes, 1)

    def end_task(self, t, module, datamodule):
        super().end_task(t, module, datamodule)
        if self.buffer_size == 0:  # e.g. distillation alone
            return
        new_classes = datamodule.classes_of_increment(t)
        m = self.per_class(len(self.memory) + len(new_classes))
        for c in list(self.memory):  # shrink old classes: herding order means a prefix is still herded
            self.memory[c] = self.memory[c][:m]
        pool_labels = datamodule.train_labels(datamodule.train_pool)
        for c in new_classes:
            self.memory[c] = self.select_exemplars(datamodule.train_pool[pool_labels == c], m, t, c, module, datamodule)
        datamodule.memory_indices = self.memory_indices()

    def select_exemplars(self, pool: torch.Tensor, m: int, t: int, c: int, module, datamodule) -> torch.Tensor:
        """``m`` of the CIFAR train indices in ``pool`` (class ``c``), best first."""
        if self.selection == "random":
            # keyed by (seed, increment, class): a resumed run draws the same, and the two classes of an
            # increment do not share one permutation
            g = stream_generator(self.seed, "exemplars", t, item=c)
            return pool[torch.randperm(len(pool), generator=g)[:m]]
        images, _ = datamodule.pool_arrays(pool)
        return pool[herding(embed_images(module, datamodule.transform, images).cpu(), m)]

    def state_dict(self):
        return {**super().state_dict(), "memory": self.memory}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.memory = state["memory"]
