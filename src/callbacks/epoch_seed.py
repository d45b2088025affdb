"""Reseeds the global RNG (augmentation, dropout) at every epoch from (seed, increment, epoch, rank), so
a run resumed from a checkpoint draws exactly what the uninterrupted run would have drawn, and no two
increments of a continual sequence replay the same draws."""
from __future__ import annotations

import torch
from pytorch_lightning.callbacks import Callback

from src.utils.seeding import stream_seed


class EpochSeed(Callback):
    def __init__(self, seed: int = 0):
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module):
        increment = getattr(trainer.datamodule, "increment", None)
        torch.manual_seed(stream_seed(self.seed, "global", increment, trainer.current_epoch, trainer.global_rank))
