"""Trains on all data of every class seen so far: the upper bound.

``matched_buffer`` sets its budget. ``null``: every epoch covers all the seen data, the classic upper bound. By the
last increment that is 5,000 images an epoch against a memory strategy's 1,500. An integer B: every epoch of
increment t draws only as many images as a memory strategy with ``strategy.buffer_size=B`` trains on: the increment's
own images plus its exemplars, the old classes sharing B equally as Replay's memory does. The images are drawn from
all the seen data. With the same epochs and batch size too, that is the same budget as the strategies compared
with it (DEVELOPERS.md: same images per epoch, same epochs, same batch size)."""
import torch

from src.continual.strategies.base import Strategy
from src.continual.strategies.replay import exemplars_per_class


class Joint(Strategy):
    name = "joint"
    cumulative = True

    def __init__(self, matched_buffer: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if matched_buffer is not None and (isinstance(matched_buffer, bool) or not isinstance(matched_buffer, int)
                                           or matched_buffer < 0):
            raise ValueError(f"strategy.matched_buffer must be null (every epoch covers all seen data) or the buffer_size "
                             f"of the memory strategy whose images per epoch joint matches (an integer >= 0); got "
                             f"{matched_buffer!r}")
        self.matched_buffer = matched_buffer

    @property
    def label(self) -> str:
        return "Joint" if self.matched_buffer is None else f"Joint (budget of a {self.matched_buffer}-image memory)"

    def begin_task(self, t, module, datamodule):
        super().begin_task(t, module, datamodule)
        datamodule.epoch_images = None if self.matched_buffer is None else self.matched_images(t, datamodule)

    @property
    def keeps_class_mean_images(self) -> bool:
        return True

    def class_mean_images(self, datamodule):
        """Every training image of the seen classes: joint keeps all of them (at a matched budget too)."""
        pool = datamodule.train_pool
        return datamodule.pool_arrays(pool[torch.isin(datamodule.train_labels(pool), torch.tensor(datamodule.seen_classes))])

    def matched_images(self, t: int, datamodule) -> int:
        """Images a memory strategy with buffer_size=matched_buffer trains on in increment t: the increment's own, plus
        Replay's share of the buffer for each old class."""
        pool_labels = datamodule.train_labels(datamodule.train_pool)
        own = int(torch.isin(pool_labels, torch.tensor(datamodule.classes_of_increment(t))).sum())
        old = len(datamodule.seen_classes) - len(datamodule.classes_of_increment(t))
        return own + exemplars_per_class(self.matched_buffer, old) * old
