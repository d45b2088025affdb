"""LwF-style regularization: keep the embedding close to the previous increment's model, either
point-wise (feature distillation) or through pairwise distances (relational distillation).
Works with or without an exemplar memory."""
from __future__ import annotations

import copy

import torch

from src.continual.strategies.replay import Replay


class Distill(Replay):
    name = "distill"

    def __init__(self, weight: float = 1.0, mode: str = "relation", buffer_size: int = 0, **kwargs):
        super().__init__(buffer_size=buffer_size, **kwargs)
        if weight < 0:
            raise ValueError(f"strategy.weight must be >= 0, got {weight}")
        if mode not in ("feature", "relation"):
            raise ValueError(f"strategy.mode must be feature or relation, got {mode!r}")
        self.weight, self.mode = weight, mode
        self.teacher: torch.nn.Module | None = None
        self._teacher_device: torch.device | None = None

    def begin_task(self, t, module, datamodule):
        super().begin_task(t, module, datamodule)
        if t > 0:
            self.teacher = copy.deepcopy(module.net).eval()
            self._teacher_device = None
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def distillation_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.mode == "feature":
            # scale-free: squared error relative to the teacher's spread
            return (student - teacher).pow(2).sum(1).mean() / teacher.var(0).sum().clamp_min(1e-8)
        ds, dt = torch.cdist(student, student), torch.cdist(teacher, teacher)
        return torch.nn.functional.smooth_l1_loss(ds / ds.mean().clamp_min(1e-8), dt / dt.mean().clamp_min(1e-8))

    def observe(self, module, batch, embeddings, loss):
        loss = super().observe(module, batch, embeddings, loss)  # the memory batch's loss, in replay_mode=batch
        if self.teacher is None or self.weight == 0:
            return loss
        if self._teacher_device != embeddings.device:  # once, not a walk over the modules every step
            self.teacher.to(embeddings.device)
            self._teacher_device = embeddings.device
        with torch.no_grad():
            target = self.teacher(batch[0]).float()
        kd = self.distillation_loss(embeddings.float(), target)
        module.log_train({"train/distill": kd})
        return loss + self.weight * kd

    # No state of its own to save: the teacher is re-snapshotted from the restored model at the next
    # begin_task, which is exactly the model it was taken from.
