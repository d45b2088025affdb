"""Reseeds the global RNG (augmentation, dropout) at every epoch from (seed, epoch), so a run resumed
from a checkpoint draws exactly what the uninterrupted run would have drawn."""
from __future__ import annotations

import torch
from pytorch_lightning.callbacks import Callback


class EpochSeed(Callback):
    def __init__(self, seed: int = 0):
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module):
        torch.manual_seed(self.seed * 100_003 + trainer.current_epoch * 7 + trainer.global_rank * 1_000_003)
