"""DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for General Continual Learning").

A reservoir buffer keeps (image, label, logits at insertion time) of the training stream. Each step adds
    alpha * MSE(logits of buffer images now, their stored logits)        (dark knowledge)
  + beta  * cross-entropy(logits of other buffer images, their labels)  (the "++")
to the model's own loss, with buffer images augmented like the training batch. Defaults are the paper's
Seq-CIFAR-10, buffer-500 values (alpha 0.2, beta 0.5; mammoth's best_args); learning rate, batch size and
epochs stay the harness's, so DER++ gets the same budget as the other strategies.

It needs classifier logits, so it runs with ``model=softmax``. Magnet models have no logits to store: the
analogue on embeddings (MSE to stored embeddings) is a feature distillation towards an old snapshot, which
``strategy=magnet_memory strategy.mode=feature`` already provides with a whole-model teacher, and DER's
random buffer batches carry no cluster structure for the magnet loss' beta term."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from src.continual.reservoir import ReservoirBuffer
from src.continual.strategies.base import Strategy
from src.utils.seeding import stream_generator


class DER(Strategy):
    name = "der"

    def __init__(self, buffer_size: int = 500, alpha: float = 0.2, beta: float = 0.5, seed: int = 0,
                 joint_forward: bool = True, **kwargs):
        super().__init__(**kwargs)
        if alpha < 0 or beta < 0:
            raise ValueError(f"strategy.alpha and strategy.beta must be >= 0, got {alpha}, {beta}")
        self.alpha, self.beta, self.seed = alpha, beta, seed
        # True (default): one pass over the current and both buffer batches concatenated, so BatchNorm normalises
        # old and new classes with the same batch statistics (Avalanche's DER also does one joint pass).
        # False: three passes per step (current batch, then each buffer batch), as the paper and mammoth. Chosen on
        # validation: with three passes each batch is normalised by its own statistics, and at this budget
        # (80 steps per increment) every old class fell to 0 % Class-IL after the next increment (README).
        self.joint_forward = joint_forward
        self._buffer_outputs = None  # (embeddings, stored logits) of the alpha batch, (embeddings, labels) of beta
        self.buffer = ReservoirBuffer(buffer_size)
        self._train_images: torch.Tensor | None = None  # the increment's uint8 training images, on the device
        self._transform = None

    def begin_task(self, t, module, datamodule):
        super().begin_task(t, module, datamodule)
        if not module.predicts_with_logits:
            raise ValueError(f"strategy=der needs classifier logits; {type(module).__name__} has none. Use model=softmax, "
                             "or strategy=magnet_memory for a magnet model (see src/continual/strategies/der.py)")
        # insertion decisions and buffer draws of increment t: a resumed sequence repeats them exactly
        self.buffer.generator = stream_generator(self.seed, "exemplars", t)
        self._train_images = datamodule.train_arrays()[0]
        self._transform = datamodule.transform

    def _buffer_batches(self, size: int):
        """Two independent buffer batches of ``size`` (augmented): (images, stored logits), (images, labels)."""
        images_a, _, stored = self.buffer.sample(size)
        images_b, labels, _ = self.buffer.sample(size)
        return (self._transform(images_a, train=True), stored), (self._transform(images_b, train=True), labels)

    def forward(self, module, x):
        if not (self.joint_forward and len(self.buffer)):
            return module(x)
        (xa, stored), (xb, labels) = self._buffer_batches(len(x))
        emb, emb_a, emb_b = self.forward_together(module, x, xa, xb)
        self._buffer_outputs = ((emb_a, stored), (emb_b, labels))
        return emb

    def observe(self, module, batch, embeddings, loss):
        x, y, positions = batch
        logits = module.classifier_logits(embeddings)
        if self._train_images.device != x.device:
            self._train_images = self._train_images.to(x.device)
        if len(self.buffer):
            if self._buffer_outputs is not None:  # computed in the joint forward pass
                (emb_a, stored), (emb_b, labels) = self._buffer_outputs
                self._buffer_outputs = None
            else:
                (xa, stored), (xb, labels) = self._buffer_batches(len(y))
                emb_a = module(xa) if self.alpha else None
                emb_b = module(xb) if self.beta else None
            if self.alpha:
                dark = F.mse_loss(module.classifier_logits(emb_a).float(), stored.float())
                module.log_train({"train/der_mse": dark})
                loss = loss + self.alpha * dark
            if self.beta:
                ce = F.cross_entropy(module.classifier_logits(emb_b), labels)
                module.log_train({"train/der_ce": ce}, prog_bar=False)
                loss = loss + self.beta * ce
        # the un-augmented images go in, with the logits the model gave their augmented view (as the paper)
        self.buffer.add(self._train_images[positions.to(self._train_images.device)], y, logits)
        return loss

    def end_task(self, t, module, datamodule):
        super().end_task(t, module, datamodule)
        self._train_images = None  # the next increment brings its own

    @property
    def keeps_class_mean_images(self) -> bool:
        return True

    def class_mean_images(self, datamodule):
        """The reservoir's images (a class the reservoir holds no image of gets no mean and is never predicted)."""
        n = len(self.buffer)
        return (self.buffer.images[:n].cpu(), self.buffer.labels[:n].cpu()) if n else None

    def state_dict(self):
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
