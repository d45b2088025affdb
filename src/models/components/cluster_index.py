"""The per-class k-means cluster index that magnet loss samples from and classifies with."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class ClusterIndex:
    centroids: torch.Tensor  # [C, E] float32
    centroid_labels: torch.Tensor  # [C] long
    assignments: torch.Tensor  # [N] long: cluster of each training position
    variance: float = float("nan")  # sum of squared distances to own centroid / (N - 1)
    seed: int = 0  # k-means seed it was built with: the test repeats the selected epoch's clustering exactly
    impostor_ranking: torch.Tensor = field(init=False)  # [C, R]: other-class clusters, nearest first (-1 pads)

    def __post_init__(self):
        self.centroids = self.centroids.float().contiguous()
        self.members = [(self.assignments == c).nonzero().flatten() for c in range(self.num_clusters)]
        if any(len(m) == 0 for m in self.members):
            raise RuntimeError("cluster index has an empty cluster; this is a bug in build_cluster_index")
        self.impostor_ranking = rank_impostors(self.centroids, self.centroid_labels)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def cluster_sizes(self) -> torch.Tensor:
        return torch.tensor([len(m) for m in self.members], dtype=torch.long)

    def state_dict(self) -> dict:
        return {"centroids": self.centroids, "centroid_labels": self.centroid_labels,
                "assignments": self.assignments, "variance": self.variance, "seed": self.seed}

    @classmethod
    def from_state_dict(cls, state: dict) -> ClusterIndex:
        return cls(state["centroids"], state["centroid_labels"], state["assignments"], state.get("variance", float("nan")),
                   state.get("seed", 0))


def rank_impostors(centroids: torch.Tensor, centroid_labels: torch.Tensor) -> torch.Tensor:
    """For each cluster, all clusters of other classes ordered by centroid distance (FAISS exact L2)."""
    c = centroids.shape[0]
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids.numpy())
    _, order = index.search(centroids.numpy(), c)
    order = torch.from_numpy(order).long()
    other = centroid_labels[order] != centroid_labels[:, None]
    width = int(other.sum(1).max()) if c else 0
    ranking = torch.full((c, width), -1, dtype=torch.long)
    for i in range(c):
        row = order[i][other[i]]
        ranking[i, : len(row)] = row
    return ranking


def kmeans_assign(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    """Cluster labels in 0..k'-1 with no empty cluster (k' <= k)."""
    n = x.shape[0]
    if k <= 1 or n <= 1:
        return np.zeros(n, dtype=np.int64)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, min_points_per_centroid=1,
                      max_points_per_centroid=100_000, verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign[:, 0].astype(np.int64)
    # FAISS re-splits empty clusters while training, but the final assignment can still leave one
    # empty; renumber the used ones so no empty cluster survives.
    _, assign = np.unique(assign, return_inverse=True)
    return assign.reshape(-1).astype(np.int64)


def build_cluster_index(embeddings: torch.Tensor, labels: torch.Tensor, k: int, seed: int = 0,
                        niter: int = 20) -> ClusterIndex:
    """k-means with ``k`` clusters on each class's embeddings; centroids are the members' means."""
    if k < 1:
        raise ValueError(f"K (clusters per class) must be >= 1, got {k}")
    emb = embeddings.detach().float().cpu().contiguous()
    labels = labels.cpu().long()
    assignments = torch.empty(len(labels), dtype=torch.long)
    centroids, centroid_labels = [], []
    for cls in torch.unique(labels).tolist():
        pos = (labels == cls).nonzero().flatten()
        k_cls = min(k, len(pos))
        if k_cls < k:
            log.warning(f"class {cls} has only {len(pos)} training images, fewer than K={k}: using {k_cls} clusters")
        local = torch.from_numpy(kmeans_assign(emb[pos].numpy(), k_cls, seed + cls, niter))
        base = len(centroids)
        for j in range(int(local.max()) + 1):
            members = pos[local == j]
            centroids.append(emb[members].mean(0))
            centroid_labels.append(cls)
        assignments[pos] = local + base
    centroids = torch.stack(centroids)
    spread = (emb - centroids[assignments]).pow(2).sum()
    variance = float(spread / max(len(labels) - 1, 1))
    return ClusterIndex(centroids, torch.tensor(centroid_labels, dtype=torch.long), assignments, variance, seed)


class ClusterState:
    """What the sampler, the loss and the callback share: the current index and per-example losses.

    The per-example losses are sized by the index: a new index over a different training set (the next
    increment) starts them afresh, one over the same set keeps them for the sampler's seed choice.

    On an accelerator the training step writes its losses into a copy on the device (no host sync), and
    the sampler pulls that copy into ``example_losses`` every few batches (``sync_losses``). On the CPU
    the step writes ``example_losses`` directly, exactly as before."""

    def __init__(self, num_examples: int = 0):
        self._index: ClusterIndex | None = None
        self.example_losses = torch.full((num_examples,), float("nan"))
        self._device_losses: torch.Tensor | None = None
        self._index_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def index(self) -> ClusterIndex | None:
        return self._index

    @index.setter
    def index(self, index: ClusterIndex | None) -> None:
        self.sync_losses()
        if index is not None and len(self.example_losses) != len(index.assignments):
            self.example_losses = torch.full((len(index.assignments),), float("nan"))
        self._device_losses, self._index_on = None, {}
        self._index = index

    def reset(self) -> None:
        self._index, self._device_losses, self._index_on = None, None, {}
        self.example_losses = torch.full((0,), float("nan"))

    def index_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The index's assignments [N] and cluster labels [C] on ``device``, copied once per index."""
        if device not in self._index_on:
            self._index_on[device] = (self._index.assignments.to(device), self._index.centroid_labels.to(device))
        return self._index_on[device]

    def record_losses(self, positions: torch.Tensor, losses: torch.Tensor) -> None:
        losses = losses.detach().float()
        if losses.device.type == "cpu":
            self.example_losses[positions] = losses
            return
        if self._device_losses is None or self._device_losses.device != losses.device:
            self._device_losses = self.example_losses.to(losses.device)
        self._device_losses[positions] = losses

    def sync_losses(self) -> None:
        """Bring the device's per-example losses to ``example_losses`` (one host sync; none on the CPU)."""
        if self._device_losses is not None:
            self.example_losses = self._device_losses.cpu()

    def cluster_losses(self) -> torch.Tensor:
        """Mean loss of each cluster; a cluster with no measured member gets the mean of the measured ones."""
        index = self.index
        measured = ~torch.isnan(self.example_losses)
        a = index.assignments[measured]
        sums = torch.zeros(index.num_clusters).index_add_(0, a, self.example_losses[measured])
        counts = torch.bincount(a, minlength=index.num_clusters).float()
        means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan)
        fill = means[counts > 0].mean() if (counts > 0).any() else torch.tensor(1.0)
        return torch.where(counts > 0, means, fill)

    def state_dict(self) -> dict:
        self.sync_losses()
        return {"index": None if self.index is None else self.index.state_dict(), "example_losses": self.example_losses}

    def load_state_dict(self, state: dict) -> None:
        self._index = None if state.get("index") is None else ClusterIndex.from_state_dict(state["index"])
        self.example_losses = state["example_losses"]
        self._device_losses, self._index_on = None, {}
