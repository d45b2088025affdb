"""A continual strategy is one class with three hooks (mammoth style):

- ``begin_task(t, module, datamodule)``: before training increment t (set memory, snapshot teachers);
- ``observe(module, batch, embeddings, loss)``: in each training step; returns the loss to optimize;
- ``after_training(t, module)``: right after increment t's training, before anything is measured; it may change the
  weights (True: the runner then rebuilds the cluster index, re-estimating BatchNorm, from the new weights);
- ``end_task(t, module, datamodule)``: after training increment t (update memory, compensate drift).

``eval_centroids`` decides which cluster centroids classify each seen class after an increment; ``class_mean_images``
gives the images a nearest-class-mean read-out (``model.readout=ncm``, iCaRL) takes its class means from."""
from __future__ import annotations

import torch


class Strategy:
    name = "base"
    cumulative = False  # train on every seen class's data (the joint upper bound)
    # the read-out the strategy is measured with whatever model.readout says: None (follow model.readout) or "ncm"
    # (iCaRL: nearest mean of exemplars)
    readout: str | None = None

    def __init__(self, **kwargs):
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unknown settings {sorted(kwargs)}")
        self.stored_centroids: dict[int, torch.Tensor] = {}  # class -> [k, E], as last trained

    @property
    def label(self) -> str:
        """How tables and figures name this strategy's runs (``src.compare`` groups runs by it)."""
        return type(self).__name__

    def begin_task(self, t: int, module, datamodule) -> None:
        datamodule.cumulative = self.cumulative

    def forward(self, module, x: torch.Tensor) -> torch.Tensor:
        """The training step's forward pass of the batch ``x``. A strategy may run extra images (a buffer
        batch) through the same call, so that they share BatchNorm's batch statistics, and keep their outputs
        for ``observe``; it returns the embeddings of ``x`` only."""
        return module(x)

    @staticmethod
    def forward_together(module, x: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One forward pass over ``x`` and the ``extra`` batches concatenated (so BatchNorm's batch statistics
        cover them all), split back into the embeddings of each."""
        return module(torch.cat([x, *extra])).split([len(x), *(len(e) for e in extra)])

    def observe(self, module, batch, embeddings: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def logit_mask(self, y: torch.Tensor) -> torch.Tensor | None:
        """For each training row (label ``y``), the classes its cross-entropy competes over ([B, C] booleans), or None
        for every class. Here: every class."""
        return None

    def restrict_logits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``logits`` with the classes ``logit_mask`` leaves out of each row's cross-entropy set to -inf."""
        allowed = self.logit_mask(y)
        return logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))

    def impostor_mask(self, y: torch.Tensor) -> torch.Tensor | None:
        """For each training row, the classes whose clusters may be its magnet loss's impostors ([B, C] booleans), or
        None for every class. Here: every class."""
        return None

    def after_training(self, t: int, module) -> bool:
        """Change the trained weights before they are measured; True when they changed. Here: never."""
        return False

    def check_balanced_set(self) -> None:
        """Raise unless ``balanced_set`` can give a class-balanced training set (continual.balanced_epochs > 0)."""
        raise ValueError(f"continual.balanced_epochs trains on a class-balanced exemplar set, which strategy={self.name} "
                         "does not keep; use strategy=replay or magnet_memory, or continual.balanced_epochs=0")

    def balanced_set(self, t: int, module, datamodule) -> torch.Tensor:
        """CIFAR train indices with as many images of every seen class, for the balanced phase of increment t."""
        self.check_balanced_set()
        raise NotImplementedError

    def end_task(self, t: int, module, datamodule) -> None:
        """Remember the centroids of the classes this increment introduced, computed on all their data."""
        index = module.cluster_state.index
        for c in datamodule.classes_of_increment(t):
            self.stored_centroids[c] = index.centroids[index.centroid_labels == c].clone()

    def uses_fresh_centroids(self, c: int, index) -> bool:
        """Does class ``c`` take its centroids from the current index (else: those stored when last trained)?
        Here: whenever the index holds the class (it was trained on, or replayed in, this increment)."""
        return bool((index.centroid_labels == c).any())

    def eval_centroids(self, seen_classes: list[int], module) -> tuple[torch.Tensor, torch.Tensor]:
        """Centroids and their labels for the magnet rule over ``seen_classes``: fresh ones from the current
        index or stale ones stored at the end of the class's increment, as ``uses_fresh_centroids`` says."""
        index = module.cluster_state.index
        cents, labels = [], []
        for c in seen_classes:
            fresh = self.uses_fresh_centroids(c, index) or c not in self.stored_centroids
            cent = index.centroids[index.centroid_labels == c] if fresh else self.stored_centroids[c]
            if len(cent) == 0:
                continue
            cents.append(cent)
            labels.append(torch.full((len(cent),), c, dtype=torch.long))
        return torch.cat(cents), torch.cat(labels)

    @property
    def keeps_class_mean_images(self) -> bool:
        """Does the strategy legitimately keep images of every seen class to compute class means from?"""
        return False

    def class_mean_images(self, datamodule) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(uint8 images, labels) the nearest-class-mean read-out computes each seen class's mean from after an
        increment, or None. Here: none (a naive fine-tuner keeps no old images)."""
        return None

    def state_dict(self) -> dict:
        return {"stored_centroids": self.stored_centroids}

    def load_state_dict(self, state: dict) -> None:
        self.stored_centroids = state["stored_centroids"]
