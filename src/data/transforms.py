"""Batched augmentation on uint8 tensors (airbench style): one tensor op per batch, on whatever device
the batch lives on, instead of a PIL call per image."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class BatchTransform(torch.nn.Module):
    """uint8 [B,3,H,W] -> normalized float, with random crop (zero padding) and horizontal flip when training."""

    def __init__(self, mean, std, crop_padding: int = 4, flip: bool = True, input_size: int | None = None):
        super().__init__()
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255, persistent=False)
        self.crop_padding = crop_padding
        self.flip = flip
        self.input_size = input_size
        self._stats_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std on ``device``, copied there once (not on every batch) when the module stays put."""
        if self.mean.device == device:
            return self.mean, self.std
        if device not in self._stats_on:
            self._stats_on[device] = (self.mean.to(device), self.std.to(device))
        return self._stats_on[device]

    @staticmethod
    def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-image random translation by up to ``padding`` pixels with zero fill (torchvision's
        RandomCrop(size, padding)): two gathers (rows, then columns) indexed by each image's offset, so
        the crop never asks the host which images took which offset (no ``nonzero``, no sync)."""
        if padding == 0:
            return x
        b, c, h, w = x.shape
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
        row_idx = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * padding)
        rows = padded.gather(2, row_idx)
        col_idx = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
        return rows.gather(3, col_idx)

    @staticmethod
    def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mask = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
        return torch.where(mask[:, None, None, None], x.flip(3), x)

    def forward(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """``generator`` (on ``x``'s device) draws the augmentation instead of the global stream, for passes
        that must repeat exactly (the BatchNorm re-estimation pass of re-clustering)."""
        if x.dtype != torch.uint8:
            raise TypeError(f"BatchTransform expects uint8 images, got {x.dtype}")
        if train:
            x = self.random_crop(x, self.crop_padding, generator)
            if self.flip:
                x = self.random_flip(x, generator)
        mean, std = self.stats_on(x.device)
        x = (x.float() - mean) / std
        if self.input_size and self.input_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return x
