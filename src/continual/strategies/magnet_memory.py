"""Magnet-native continual learning: a cluster memory.

Each class keeps the K centroids computed on all of its data at the end of the increment that
introduced it, and those clusters classify it from then on (magnet rule over every seen cluster).
Exemplars are replayed, the previous model is distilled, and after each increment every old
centroid is moved by the mean drift of its exemplars' embeddings (old model -> new model), so the
stored clusters follow the embedding as it changes (semantic drift compensation)."""
from __future__ import annotations

import torch

from src.continual.strategies.distill import Distill
from src.models.embed import embed_images


class MagnetMemory(Distill):
    name = "magnet_memory"

    def __init__(self, buffer_size: int = 500, compensate_drift: bool = True, **kwargs):
        super().__init__(buffer_size=buffer_size, **kwargs)
        self.compensate_drift = compensate_drift
        self.exemplar_embeddings: dict[int, torch.Tensor] = {}  # class -> embeddings under the last model
        self.current_classes: list[int] = []

    def _embed_memory(self, module, datamodule) -> dict[int, torch.Tensor]:
        out = {}
        for c, idx in self.memory.items():
            images, _ = datamodule.pool_arrays(idx)
            out[c] = embed_images(module, datamodule.transform, images).cpu()
        return out

    def end_task(self, t, module, datamodule):
        if self.compensate_drift and self.exemplar_embeddings:
            now = self._embed_memory(module, datamodule)
            for c, before in self.exemplar_embeddings.items():
                if c in self.stored_centroids and c in now:
                    self.stored_centroids[c] = shift_centroids(self.stored_centroids[c], before, now[c][: len(before)])
        super().end_task(t, module, datamodule)  # stores the new classes' centroids, updates the memory
        self.exemplar_embeddings = self._embed_memory(module, datamodule)

    def uses_fresh_centroids(self, c, index):
        # Old classes keep the clusters computed on all their data (drift-compensated); the few exemplars
        # in the current index would describe them worse.
        return c in self.current_classes

    def begin_task(self, t, module, datamodule):
        self.current_classes = datamodule.classes_of_increment(t)
        super().begin_task(t, module, datamodule)

    def state_dict(self):
        return {**super().state_dict(), "exemplar_embeddings": self.exemplar_embeddings,
                "current_classes": self.current_classes}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.exemplar_embeddings = state["exemplar_embeddings"]
        self.current_classes = state["current_classes"]  # src.eval re-evaluates the saved increment with them


def shift_centroids(centroids: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Move each centroid by the mean drift (after - before) of the exemplars nearest to it (under the
    old embedding); a centroid with no exemplar moves by the class's mean drift."""
    drift = after - before
    nearest = torch.cdist(before, centroids).argmin(1)
    shifted = centroids.clone()
    for k in range(len(centroids)):
        mine = nearest == k
        shifted[k] += drift[mine].mean(0) if mine.any() else drift.mean(0)
    return shifted
