"""iCaRL (Rebuffi et al., CVPR 2017, "iCaRL: Incremental Classifier and Representation Learning"), on ``model=softmax``.

Its three parts, each on this harness's existing machinery:

- exemplars: Replay's class-balanced memory of ``buffer_size`` images chosen by herding (a prefix of each class's herded
  order survives when the memory shrinks), herded on the L2-normalised embedding as the paper's feature map;
- representation learning: one binary cross-entropy on the sigmoid of every seen class's logit, over the increment's
  images and the exemplars. The targets of the classes this increment brings are the one-hot labels; those of the
  earlier classes are the sigmoid outputs of the network as it ended the previous increment (Distill's frozen teacher,
  copied from the restored model at ``begin_task``, so a resumed sequence gets the same teacher). It replaces the
  model's cross-entropy;
- classification: the nearest mean of exemplars on the L2-normalised embedding the head sits on (``readout = "ncm"``:
  the runner measures it first and the head's argmax beside it; src/continual/runner.py ``ncm_class_means``).

The paper adds the exemplars to the increment's training set (``replay_mode=dataset``, the default here). With
``replay_mode=batch`` each step appends as many exemplars, and the loss covers both batches (one BCE over their rows).
Learning rate, batch size and epochs stay the harness's, so iCaRL gets the same budget as the other strategies."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from src.continual.strategies.distill import Distill


class ICaRL(Distill):
    name = "icarl"
    readout = "ncm"

    def __init__(self, buffer_size: int = 500, selection: str = "herding", seed: int = 0, replay_mode: str = "dataset",
                 teacher_bn: str = "running", **kwargs):
        if buffer_size < 1:
            raise ValueError(f"strategy.buffer_size must be >= 1 for iCaRL (its exemplars are its classifier), got {buffer_size}")
        super().__init__(buffer_size=buffer_size, selection=selection, seed=seed, replay_mode=replay_mode,
                         teacher_bn=teacher_bn, weight=1.0, mode="feature", **kwargs)
        self._num_seen = 0  # classes seen so far, a host integer (the loss's denominator never reads the device)

    @property
    def label(self) -> str:
        return "iCaRL"

    @property
    def uses_class_masks(self) -> bool:
        return True  # the loss needs the increment's and the seen classes

    def begin_task(self, t, module, datamodule):
        if not module.predicts_with_logits:
            raise ValueError(f"strategy=icarl needs classifier logits; {type(module).__name__} has none. Use model=softmax")
        super().begin_task(t, module, datamodule)  # memory, class masks, teacher snapshot (t > 0)
        self._num_seen = len(datamodule.seen_classes)

    def herding_features(self, emb):
        return F.normalize(emb, dim=1)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The previous increment's network's logits of ``x`` (no gradient)."""
        if self._teacher_device != x.device:  # once, not a walk over the modules every step
            self.teacher.to(x.device)
            self._teacher_device = x.device
        with torch.no_grad():
            return self.teacher.classifier(self.teacher(x)).float()

    def targets(self, y: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """[B, C] BCE targets: one-hot labels, with the earlier classes' columns replaced by the teacher's sigmoid
        outputs of ``x`` (none before a teacher exists). A device-side ``where``: no host sync, static shapes."""
        new, seen = self._masks_on(y.device)
        onehot = (y[:, None] == torch.arange(len(seen), device=y.device)[None, :]).float()  # F.one_hot checks on the host
        if self.teacher is None:
            return onehot
        old = seen & ~new
        return torch.where(old[None, :], torch.sigmoid(self.teacher_logits(x)), onehot)

    def icarl_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One BCE over every seen class's logit, averaged over rows and seen classes (future classes left out)."""
        _, seen = self._masks_on(y.device)
        bce = F.binary_cross_entropy_with_logits(logits.float(), self.targets(y, x), reduction="none")
        return (bce * seen[None, :]).sum() / (len(y) * self._num_seen)

    def observe(self, module, batch, embeddings, loss):
        x, y, _ = batch
        logits = module.classifier_logits(embeddings)
        if self._memory_outputs is not None:  # replay_mode=batch: the step's exemplar batch joins the loss
            memory_emb, memory_y = self._memory_outputs
            self._memory_outputs = None
            logits = torch.cat([logits, module.classifier_logits(memory_emb)])
            x, y = torch.cat([x, self._memory_inputs]), torch.cat([y, memory_y])
            self._memory_inputs = None
        bce = self.icarl_loss(logits, y, x)
        module.log_train({"train/icarl_bce": bce})
        return bce  # iCaRL's loss replaces the cross-entropy
