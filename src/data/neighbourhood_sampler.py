"""Magnet loss's neighbourhood batches: M clusters x D images around a hard seed cluster."""
from __future__ import annotations

import math

import torch

from src.data.loaders import epoch_order
from src.models.components.cluster_index import ClusterState
from src.utils.seeding import stream_generator

SEED_WEIGHTS = ("mean_loss", "total_loss")
WARMUP_BATCHES = ("iid", "permutation")


def seed_probabilities(cluster_losses: torch.Tensor, floor: float = 1e-3,
                       cluster_sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Proportional to each cluster's mean loss (times its size, when ``cluster_sizes`` is given), with a
    floor (relative to the mean) so that no cluster, and never all of them, has probability zero."""
    w = cluster_losses.clamp_min(0).nan_to_num(0.0)
    if cluster_sizes is not None:
        w = w * cluster_sizes.to(w.dtype)
    level = w.mean() if w.sum() > 0 else torch.tensor(1.0)
    w = w + floor * level
    return w / w.sum()


def split_quota(total: int, parts: int) -> list[int]:
    """``total`` images over ``parts`` clusters as evenly as possible, the seed cluster (first) first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def size_quota(total: int, sizes: torch.Tensor, power: float, floor: int = 2) -> list[int]:
    """``total`` images over the chosen clusters (seed first) in proportion to ``size ** power``, at least
    ``floor`` each (a cluster's in-batch mean needs members; the rest is shared among the others in the same
    proportion), rounded by largest remainder with ties to the earlier cluster. ``power`` 0 is
    ``split_quota``'s equal share, 1 a share proportional to size, 0.5 the square-root sampling of
    long-tailed recognition between the two."""
    parts = len(sizes)
    floor = min(floor, total // parts)
    weights = sizes.double() ** power
    at_floor = torch.zeros(parts, dtype=torch.bool)
    while True:  # at most ``parts`` rounds: each fixes at least one more cluster at the floor
        free = total - floor * int(at_floor.sum())
        raw = torch.where(at_floor, 0.0, free * weights / weights[~at_floor].sum())
        below = ~at_floor & (raw < floor)
        if not below.any():
            break
        at_floor |= below
    quotas = raw.floor().long()
    left = free - int(quotas.sum())
    # largest fractional part first; a stable sort keeps the earlier cluster (the seed) first among equals
    order = torch.sort(-(raw - quotas).masked_fill(at_floor, -1.0), stable=True).indices[:left]
    quotas[order] += 1
    return torch.where(at_floor, floor, quotas).tolist()


def draw_members(pool: torch.Tensor, count: int, g: torch.Generator) -> torch.Tensor:
    """``count`` members of ``pool``: without replacement as far as the pool goes, then with replacement."""
    first = pool[torch.randperm(len(pool), generator=g)[:count]]
    if len(first) == count:
        return first
    return torch.cat([first, pool[torch.randint(len(pool), (count - len(first),), generator=g)]])


class NeighbourhoodBatchSampler:
    """Yields index batches of exactly M*D images: M clusters x D images around a seed cluster, in
    cluster order; random batches of M*D until an index exists.

    ``warmup_batches``: how those batches before the first index are drawn. ``iid`` draws each batch afresh, so
    an epoch sees about 63 % of the images (each image's count is roughly Poisson(1)); ``permutation`` slices one
    permutation per epoch, as softmax's ``RandomBatchSampler`` does with the same stream (its batches are these,
    but for the last, which is topped up from a second permutation to keep M*D images), so every image is seen
    once an epoch. DDP ranks take disjoint strides of that permutation.

    When fewer than M clusters can be chosen (a two-class increment has only 2K clusters, and the seed's
    own class offers no impostor), the chosen clusters supply the M*D images between them, so the batch
    size and so the images an epoch trains on do not depend on how many classes the data holds.

    ``seed_weight``: the paper draws the seed cluster in proportion to its loss. With clusters of similar
    size, the mean loss (``mean_loss``) is that. With very unequal clusters (a continual increment's 500
    images per class beside a memory of a few dozen per old class) every cluster is then seeded equally
    often, so the few memory images are drawn several times an epoch and the new classes' images a
    fraction of a time; ``total_loss`` (mean loss x size) seeds a cluster as often as its images earn.

    ``quota_power``: how the M*D images are shared among the chosen clusters: in proportion to
    ``size ** quota_power`` (``size_quota``). 0 (the paper, D each) draws as many images from a memory
    cluster of a few dozen as from a new class of 500; 0.5 gives the new class sqrt(500 / 62) = 2.8 times the
    memory cluster's share, 1 its full 8 times. Clusters of equal size get D each whatever the power."""

    def __init__(self, state: ClusterState, num_examples: int, m: int, d: int, seed: int = 0,
                 random_clusters: int = 0, rank: int = 0, world_size: int = 1, loss_floor: float = 1e-3,
                 increment: int | None = None, seed_weight: str = "mean_loss", loss_sync_every: int = 10,
                 quota_power: float = 0.0, warmup_batches: str = "iid"):
        if warmup_batches not in WARMUP_BATCHES:
            raise ValueError(f"model.clusters.warmup_batches must be one of {'|'.join(WARMUP_BATCHES)}, "
                             f"got {warmup_batches!r}")
        if seed_weight not in SEED_WEIGHTS:
            raise ValueError(f"model.clusters.seed_weight must be one of {'|'.join(SEED_WEIGHTS)}, got {seed_weight!r}")
        if not 0 <= quota_power <= 1:
            raise ValueError(f"model.clusters.quota_power must be in [0, 1] (0: D images per cluster), got {quota_power}")
        if m < 2:
            raise ValueError(f"model.clusters.M must be >= 2 (a seed cluster and at least one impostor), got {m}")
        if d < 1:
            raise ValueError(f"model.clusters.D must be >= 1, got {d}")
        if not 0 <= random_clusters < m:
            raise ValueError(f"model.clusters.random_clusters must be in 0..M-1, got {random_clusters}")
        self.state, self.n, self.m, self.d, self.seed = state, num_examples, m, d, seed
        self.random_clusters = random_clusters
        self.rank, self.world_size, self.loss_floor = rank, world_size, loss_floor
        self.increment, self.seed_weight, self.quota_power = increment, seed_weight, float(quota_power)
        self.warmup_batches = warmup_batches
        # on an accelerator the seed choice reads the losses as of at most this many batches ago (one host
        # sync per that many steps); on the CPU they are always current
        self.loss_sync_every = max(int(loss_sync_every), 1)
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        return self.m * self.d

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.n / self.batch_size) / self.world_size)

    def __iter__(self):
        g = stream_generator(self.seed, "batches", self.increment, self.epoch, self.rank)
        warmup_order = None
        for i in range(len(self)):
            if i % self.loss_sync_every == 0:
                self.state.sync_losses()
            if self.state.index is not None:
                yield self.sample_batch(g)
            elif self.warmup_batches == "iid":
                yield torch.randperm(self.n, generator=g)[: self.batch_size]
            else:
                if warmup_order is None:
                    # softmax's epoch order (its first permutation), extended until every rank's batches are full
                    need = len(self) * self.batch_size * self.world_size
                    warmup_order = epoch_order(self.n, self.seed, self.increment, self.epoch, need)[
                        self.rank :: self.world_size]
                yield warmup_order[i * self.batch_size : (i + 1) * self.batch_size]

    def choose_clusters(self, g: torch.Generator) -> torch.Tensor:
        index = self.state.index
        sizes = index.cluster_sizes() if self.seed_weight == "total_loss" else None
        probs = seed_probabilities(self.state.cluster_losses(), self.loss_floor, sizes)
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
        chosen = self.choose_clusters(g).tolist()
        if self.quota_power == 0:
            quotas = split_quota(self.batch_size, len(chosen))  # D each when M clusters were found
        else:
            quotas = size_quota(self.batch_size, self.state.index.cluster_sizes()[chosen], self.quota_power)
        return torch.cat([draw_members(members[c], q, g) for c, q in zip(chosen, quotas)])
