"""LwF-style regularization: keep the embedding close to the previous increment's model, either
point-wise (feature distillation) or through pairwise distances (relational distillation).
Works with or without an exemplar memory."""
from __future__ import annotations

import copy

import torch

from src.continual.strategies.replay import Replay
from src.models.embed import batchnorm_layers


class Distill(Replay):
    name = "distill"

    def __init__(self, weight: float = 1.0, mode: str = "relation", buffer_size: int = 0, teacher_bn: str = "running",
                 interpolate_previous: float = 0.0, distill_on: str = "batch", **kwargs):
        super().__init__(buffer_size=buffer_size, **kwargs)
        if weight < 0:
            raise ValueError(f"strategy.weight must be >= 0, got {weight}")
        if mode not in ("feature", "relation"):
            raise ValueError(f"strategy.mode must be feature or relation, got {mode!r}")
        if teacher_bn not in ("running", "batch"):
            raise ValueError(f"strategy.teacher_bn must be running or batch, got {teacher_bn!r}")
        if distill_on not in ("batch", "memory"):
            raise ValueError(f"strategy.distill_on must be batch or memory, got {distill_on!r}")
        if distill_on == "memory" and buffer_size == 0:
            raise ValueError("strategy.distill_on=memory distils on the memory's images, but strategy.buffer_size is 0: "
                             "give the strategy a memory, or set strategy.distill_on=batch")
        self.weight, self.mode = weight, mode
        # Which images of a training batch the distillation compares. batch: all of them. memory: only the exemplars of
        # earlier classes. The teacher never saw the new classes, so over the whole batch it pins their embeddings (or
        # their distances to the old classes) to where the old model put them, next to the old classes they resemble.
        self.distill_on = distill_on
        # How the teacher's BatchNorm normalizes the training batch. running: its running statistics (the
        # evaluation-time network). batch: the batch's own statistics, as the student's BatchNorm does in a training
        # step, so a student equal to the teacher gets zero loss; with running statistics, a neighbourhood batch of a
        # few similar classes is normalized differently by the two, and the loss pulls the student away from the
        # teacher from the first step.
        self.teacher_bn = teacher_bn
        if isinstance(interpolate_previous, bool) or not isinstance(interpolate_previous, (int, float)) \
                or not 0 <= interpolate_previous < 1:
            raise ValueError("strategy.interpolate_previous must be a number in [0, 1) (the previous increment's share of "
                             f"the merged weights; 0: off), got {interpolate_previous!r}")
        # Weight interpolation (Kozal et al. 2024, "Continual learning with weight interpolation"): after each later
        # increment the weights become (1 - w) * trained + w * previous increment's, a point between a model that fits
        # the new classes and one that still holds the old ones; the two share their start, so the path between them
        # stays low-loss. The runner then re-estimates BatchNorm and rebuilds the index on the merged weights.
        self.interpolate_previous = float(interpolate_previous)
        self.teacher: torch.nn.Module | None = None
        self._teacher_device: torch.device | None = None

    def begin_task(self, t, module, datamodule):
        # checked before the first increment trains, not when the first merge is attempted an increment later
        if self.interpolate_previous > 0 and not module.uses_neighbourhood_sampler:
            raise ValueError(f"strategy.interpolate_previous needs a model whose BatchNorm statistics are re-estimated on the "
                             f"merged weights (a magnet model); {type(module).__name__} keeps its running statistics: set it to 0")
        super().begin_task(t, module, datamodule)
        if t > 0:
            self.teacher = self.snapshot_teacher(module.net)
            self._teacher_device = None

    @property
    def uses_class_masks(self) -> bool:
        return super().uses_class_masks or self.distill_on == "memory"

    def after_training(self, t, module):
        if self.interpolate_previous == 0 or self.teacher is None:
            return False
        previous = self.teacher.state_dict()
        with torch.no_grad():
            for name, value in module.net.state_dict().items():
                if value.is_floating_point():  # weights and BatchNorm statistics; not the batch counters
                    value.lerp_(previous[name].to(value.device), self.interpolate_previous)
        return True

    def snapshot_teacher(self, net: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy of ``net``: eval mode (no dropout), BatchNorm as strategy.teacher_bn says."""
        teacher = copy.deepcopy(net).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if self.teacher_bn == "batch":
            for bn in batchnorm_layers(teacher):
                bn.train()  # normalize with the batch's statistics...
                bn.momentum = 0.0  # ...and leave the running ones untouched (running = 1 * running + 0 * batch)
        return teacher

    def distillation_loss(self, student: torch.Tensor, teacher: torch.Tensor,
                          keep: torch.Tensor | None = None) -> torch.Tensor:
        """Distillation over every row, or over the rows of the boolean mask ``keep``."""
        if keep is not None:
            return self.masked_distillation_loss(student, teacher, keep)
        if self.mode == "feature":
            # scale-free: squared error relative to the teacher's spread
            return (student - teacher).pow(2).sum(1).mean() / teacher.var(0).sum().clamp_min(1e-8)
        ds, dt = torch.cdist(student, student), torch.cdist(teacher, teacher)
        return torch.nn.functional.smooth_l1_loss(ds / ds.mean().clamp_min(1e-8), dt / dt.mean().clamp_min(1e-8))

    def masked_distillation_loss(self, student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The same loss over the kept rows alone. Masked rather than indexed, so the shapes stay static and the step never
        waits for the host; a batch without two kept rows gives 0. (The unmasked path above stays as it was, so runs
        without a mask repeat their earlier numbers to the bit.)"""
        w = keep.to(student.dtype)
        n = w.sum()
        if self.mode == "feature":
            mean = (w[:, None] * teacher).sum(0) / n.clamp_min(1.0)
            var = (w[:, None] * (teacher - mean).pow(2)).sum() / (n - 1).clamp_min(1.0)
            return (w * (student - teacher).pow(2).sum(1)).sum() / n.clamp_min(1.0) / var.clamp_min(1e-8)
        pair = w[:, None] * w[None, :]
        pairs = pair.sum().clamp_min(1.0)  # the diagonal's zero distances count, as in the unmasked mean
        ds, dt = torch.cdist(student, student), torch.cdist(teacher, teacher)
        ds = ds / ((pair * ds).sum() / pairs).clamp_min(1e-8)
        dt = dt / ((pair * dt).sum() / pairs).clamp_min(1e-8)
        return (pair * torch.nn.functional.smooth_l1_loss(ds, dt, reduction="none")).sum() / pairs

    def observe(self, module, batch, embeddings, loss):
        loss = super().observe(module, batch, embeddings, loss)  # the memory batch's loss, in replay_mode=batch
        if self.teacher is None or self.weight == 0:
            return loss
        if self._teacher_device != embeddings.device:  # once, not a walk over the modules every step
            self.teacher.to(embeddings.device)
            self._teacher_device = embeddings.device
        with torch.no_grad():
            target = self.teacher(batch[0]).float()  # the whole batch, so BatchNorm sees what the student's sees
        keep = None if self.distill_on == "batch" else ~self.new_class_rows(batch[1])
        kd = self.distillation_loss(embeddings.float(), target, keep)
        module.log_train({"train/distill": kd})
        return loss + self.weight * kd

    # No state of its own to save: the teacher is re-snapshotted from the restored model at the next
    # begin_task, which is exactly the model it was taken from.
