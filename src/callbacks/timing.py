"""Wall time per epoch, logged and shown in the progress bar."""
from __future__ import annotations

import time

from pytorch_lightning.callbacks import Callback


class EpochTimer(Callback):
    def __init__(self):
        self.epoch_seconds: list[float] = []
        self._start = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if self._start is None:
            return
        seconds = time.perf_counter() - self._start
        self.epoch_seconds.append(seconds)
        pl_module.log("time/epoch_s", seconds, prog_bar=True)
