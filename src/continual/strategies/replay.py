"""A class-balanced exemplar memory of fixed total size, chosen by herding in embedding space (or at
random), replayed in one of two ways (``strategy.replay_mode``):

- ``dataset``: memory images join the increment's training set, so they are clustered with the new data and
  their clusters act as impostors in the neighbourhood batches. The magnet strategies need this.
- ``batch``: every training step appends a batch of as many memory images (drawn without replacement,
  augmented like the current batch) to the current batch, in one forward pass, and the loss is the mean over
  both: Avalanche's ``Replay`` and mammoth's ER. Only for models with classifier logits (``model=softmax``).
- ``auto`` (default): ``batch`` for a model with classifier logits, ``dataset`` otherwise. Chosen on
  validation for softmax (README, peer table): with the memory mixed into a cross-entropy epoch each old class
  is seen 8x less often than each new one by the last increment, and most old increments fell to 0-4 %
  Class-IL (16.2 % final, validation); a memory batch per step gives 27.6 %.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from src.continual.strategies.base import Strategy
from src.models.embed import embed_images
from src.utils.seeding import stream_generator


def class_masks(num_classes: int, new_classes: list[int], seen_classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[C] booleans: this increment's classes, and every class seen so far."""
    new, seen = torch.zeros(num_classes, dtype=torch.bool), torch.zeros(num_classes, dtype=torch.bool)
    new[new_classes], seen[seen_classes] = True, True
    return new, seen


def exemplars_per_class(buffer_size: int, num_classes: int) -> int:
    """Each class's share of a memory of ``buffer_size`` images held by ``num_classes`` classes."""
    return buffer_size // max(num_classes, 1)


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

    def __init__(self, buffer_size: int = 500, selection: str = "herding", seed: int = 0, replay_mode: str = "auto",
                 asymmetric_ce: bool = False, asymmetric_magnet: bool = False, **kwargs):
        super().__init__(**kwargs)
        if buffer_size < 0:
            raise ValueError(f"strategy.buffer_size must be >= 0, got {buffer_size}")
        if selection not in ("herding", "random"):
            raise ValueError(f"strategy.selection must be herding or random, got {selection!r}")
        if replay_mode not in ("auto", "dataset", "batch"):
            raise ValueError(f"strategy.replay_mode must be auto, dataset or batch, got {replay_mode!r}")
        for key, value in (("asymmetric_ce", asymmetric_ce), ("asymmetric_magnet", asymmetric_magnet)):
            if not isinstance(value, bool):
                raise ValueError(f"strategy.{key} must be true or false, got {value!r}")
        self.buffer_size, self.selection, self.seed, self.replay_mode = buffer_size, selection, seed, replay_mode
        # ER-ACE (Caccia et al. 2022, "New insights on reducing abrupt representation change in online continual
        # learning"): the cross-entropy of a new class's image competes only over this increment's classes, that of a
        # memory image over every seen class. Without it, each new image pushes every old class's logit down, and
        # the features the old classes are read from move most when the new classes arrive.
        # asymmetric_magnet: the same for the magnet loss, whose impostors for a new class's image are then the new
        # classes' clusters only; the memory's images keep every cluster as impostor.
        self.asymmetric_ce, self.asymmetric_magnet = asymmetric_ce, asymmetric_magnet
        # (this increment's classes, every seen class) as [C] booleans, moved to the training device at the first step
        self._class_masks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.memory: dict[int, torch.Tensor] = {}  # class -> indices into the CIFAR train array, best first
        # replay_mode=batch: the memory's uint8 images and labels (on the device once the first step ran)
        self._memory_batch_source: tuple[torch.Tensor, torch.Tensor] | None = None
        self._memory_outputs = None  # (embeddings, labels) of the step's memory batch, from ``forward``
        self._memory_inputs: torch.Tensor | None = None  # and its augmented images

    def begin_task(self, t, module, datamodule):
        super().begin_task(t, module, datamodule)
        if self.replay_mode == "auto":  # fixed by the model, which does not change during the sequence
            self.replay_mode = "batch" if module.predicts_with_logits else "dataset"
        if self.replay_mode == "batch":
            if not module.predicts_with_logits:
                raise ValueError(f"strategy.replay_mode=batch needs classifier logits; {type(module).__name__} has none. "
                                 "Use model=softmax, or strategy.replay_mode=dataset (a magnet model clusters its exemplars)")
            self._transform = datamodule.transform
            self._increment, self._generator = t, None  # drawn at the first step, once the rank is known
            idx = self.memory_indices()
            self._memory_batch_source = datamodule.pool_arrays(idx) if len(idx) else None
        if self.uses_class_masks:
            self._class_masks = class_masks(module.num_classes, datamodule.classes_of_increment(t), datamodule.seen_classes)
        self._publish_memory(datamodule)

    @property
    def uses_class_masks(self) -> bool:
        """Does a training step need to know which rows are of this increment's classes?"""
        return self.asymmetric_ce or self.asymmetric_magnet

    def logit_mask(self, y):
        return self._asymmetric_mask(y) if self.asymmetric_ce else None

    def impostor_mask(self, y):
        return self._asymmetric_mask(y) if self.asymmetric_magnet else None

    def _masks_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        new, seen = self._class_masks
        if new.device != device:  # once per increment
            new, seen = self._class_masks = new.to(device), seen.to(device)
        return new, seen

    def new_class_rows(self, y: torch.Tensor) -> torch.Tensor:
        """Which training rows (labels ``y``) belong to this increment's classes, on the device (no host sync)."""
        return self._masks_on(y.device)[0][y]

    def _asymmetric_mask(self, y):
        new, seen = self._masks_on(y.device)
        # a device-side choice per row: the step never asks the host which rows are new
        return torch.where(new[y][:, None], new[None, :], seen[None, :])

    def _publish_memory(self, datamodule) -> None:
        """In ``dataset`` mode the memory joins the training set; in ``batch`` mode it stays out of it."""
        datamodule.memory_indices = self.memory_indices() if self.replay_mode == "dataset" else torch.empty(0, dtype=torch.long)

    def forward(self, module, x):
        if self._memory_batch_source is None:
            return module(x)
        images, labels = self._memory_batch_source
        if images.device != x.device:
            images, labels = self._memory_batch_source = images.to(x.device), labels.to(x.device)
        if self._generator is None:  # keyed by (seed, increment, rank): a resumed sequence repeats the draws, and
            # under DDP each rank draws other memory images
            self._generator = stream_generator(self.seed, "replay", self._increment, rank=module.global_rank)
        pick = torch.randperm(len(images), generator=self._generator)[: len(x)].to(x.device, non_blocking=True)
        memory_x = self._transform(images[pick], train=True)
        emb, memory_emb = self.forward_together(module, x, memory_x)
        self._memory_outputs = memory_emb, labels[pick]
        self._memory_inputs = memory_x  # for a strategy whose loss also needs the inputs (iCaRL's teacher)
        return emb

    def observe(self, module, batch, embeddings, loss):
        loss = super().observe(module, batch, embeddings, loss)
        if self._memory_outputs is None:
            return loss
        emb, labels = self._memory_outputs
        self._memory_outputs = None
        memory_loss = F.cross_entropy(self.restrict_logits(module.classifier_logits(emb), labels), labels)
        module.log_train({"train/replay_ce": memory_loss}, prog_bar=False)
        # the mean over the concatenated batch, as one cross-entropy over current + memory images would be
        n, m = len(embeddings), len(labels)
        return (n * loss + m * memory_loss) / (n + m)

    def memory_indices(self) -> torch.Tensor:
        if not self.memory:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([self.memory[c] for c in sorted(self.memory)])

    def per_class(self, num_classes: int) -> int:
        return exemplars_per_class(self.buffer_size, num_classes)

    def end_task(self, t, module, datamodule):
        super().end_task(t, module, datamodule)
        if self.buffer_size == 0:  # e.g. distillation alone
            return
        self.memory = self.memory_after(t, module, datamodule)
        self._memory_batch_source = None  # the next increment loads the updated memory
        self._publish_memory(datamodule)

    def memory_after(self, t, module, datamodule) -> dict[int, torch.Tensor]:
        """The memory increment t ends with: the buffer shared equally among the seen classes, the old classes
        shrunk (herding order: a prefix is still herded) and the new ones selected under ``module``'s embedding."""
        new_classes = datamodule.classes_of_increment(t)
        m = self.per_class(len(self.memory) + len(new_classes))
        memory = {c: idx[:m] for c, idx in self.memory.items()}
        pool_labels = datamodule.train_labels(datamodule.train_pool)
        for c in new_classes:
            memory[c] = self.select_exemplars(datamodule.train_pool[pool_labels == c], m, t, c, module, datamodule)
        return memory

    def check_balanced_set(self) -> None:
        if self.buffer_size == 0:
            raise ValueError("continual.balanced_epochs trains on the exemplar memory, but strategy.buffer_size=0 keeps "
                             "none; raise strategy.buffer_size or set continual.balanced_epochs=0")

    def balanced_set(self, t, module, datamodule) -> torch.Tensor:
        # the memory as it will be after this increment, selected under the weights trained so far
        memory = self.memory_after(t, module, datamodule)
        return torch.cat([memory[c] for c in sorted(memory)])

    def select_exemplars(self, pool: torch.Tensor, m: int, t: int, c: int, module, datamodule) -> torch.Tensor:
        """``m`` of the CIFAR train indices in ``pool`` (class ``c``), best first."""
        if self.selection == "random":
            # keyed by (seed, increment, class): a resumed run draws the same, and the two classes of an
            # increment do not share one permutation
            g = stream_generator(self.seed, "exemplars", t, item=c)
            return pool[torch.randperm(len(pool), generator=g)[:m]]
        images, _ = datamodule.pool_arrays(pool)
        return pool[herding(self.herding_features(embed_images(module, datamodule.transform, images).cpu()), m)]

    def herding_features(self, emb: torch.Tensor) -> torch.Tensor:
        """The features herding tracks the class mean in. Here: the embedding as it is."""
        return emb

    @property
    def keeps_class_mean_images(self) -> bool:
        return self.buffer_size > 0

    def class_mean_images(self, datamodule):
        """The memory's exemplars (after ``end_task``: the new classes' too, just selected)."""
        idx = self.memory_indices()
        return datamodule.pool_arrays(idx) if len(idx) else None

    def state_dict(self):
        return {**super().state_dict(), "memory": self.memory}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.memory = state["memory"]
