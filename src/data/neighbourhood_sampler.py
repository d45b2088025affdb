"""Magnet loss's neighbourhood batches: M clusters x D images around a hard seed cluster."""
from __future__ import annotations

import math

import torch

from src.data.loaders import rank_generator
from src.models.components.cluster_index import ClusterState


def seed_probabilities(cluster_losses: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """Proportional to each cluster's mean loss, with a floor (relative to the mean) so that no cluster,
    and never all of them, has probability zero."""
    w = cluster_losses.clamp_min(0).nan_to_num(0.0)
    level = w.mean() if w.sum() > 0 else torch.tensor(1.0)
    w = w + floor * level
    return w / w.sum()


class NeighbourhoodBatchSampler:
    """Yields index batches of M clusters x D images; random batches of M*D until an index exists."""

    def __init__(self, state: ClusterState, num_examples: int, m: int, d: int, seed: int = 0,
                 random_clusters: int = 0, rank: int = 0, world_size: int = 1, loss_floor: float = 1e-3):
        if m < 2:
            raise ValueError(f"model.sampler.M must be >= 2 (a seed cluster and at least one impostor), got {m}")
        if d < 1:
            raise ValueError(f"model.sampler.D must be >= 1, got {d}")
        if not 0 <= random_clusters < m:
            raise ValueError(f"model.sampler.random_clusters must be in 0..M-1, got {random_clusters}")
        self.state, self.n, self.m, self.d, self.seed = state, num_examples, m, d, seed
        self.random_clusters = random_clusters
        self.rank, self.world_size, self.loss_floor = rank, world_size, loss_floor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.n / (self.m * self.d)) / self.world_size)

    def __iter__(self):
        g = rank_generator(self.seed, self.epoch, self.rank)
        for _ in range(len(self)):
            index = self.state.index
            if index is None:
                yield torch.randperm(self.n, generator=g)[: self.m * self.d]
            else:
                yield self.sample_batch(g)

    def choose_clusters(self, g: torch.Generator) -> torch.Tensor:
        index = self.state.index
        probs = seed_probabilities(self.state.cluster_losses(), self.loss_floor)
        seed_cluster = int(torch.multinomial(probs, 1, generator=g))
        ranking = index.impostor_ranking[seed_cluster]
        ranking = ranking[ranking >= 0]
        n_near = min(self.m - 1 - self.random_clusters, len(ranking))
        chosen = [seed_cluster] + ranking[:n_near].tolist()
        if self.random_clusters:
            # Optional departure from the paper: a few clusters drawn uniformly from the rest, so batches
            # also see classes far from the seed's neighbourhood.
            rest = ranking[n_near:]
            pick = rest[torch.randperm(len(rest), generator=g)[: self.random_clusters]]
            chosen += pick.tolist()
        return torch.tensor(chosen, dtype=torch.long)

    def sample_batch(self, g: torch.Generator) -> torch.Tensor:
        members = self.state.index.members
        out = []
        for c in self.choose_clusters(g).tolist():
            pool = members[c]
            if len(pool) >= self.d:
                pick = torch.randperm(len(pool), generator=g)[: self.d]
            else:  # replacement only when the cluster is too small to give D distinct images
                pick = torch.randint(len(pool), (self.d,), generator=g)
            out.append(pool[pick])
        return torch.cat(out)
