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

    @staticmethod
    def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
        """Per-image random translation by up to ``padding`` pixels with zero fill (torchvision's
        RandomCrop(size, padding)). Grouping the images by offset turns the crop into 2*(2p+1) slices,
        much cheaper than a per-pixel gather."""
        if padding == 0:
            return x
        b, c, h, w = x.shape
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
        dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
        rows = torch.empty((b, c, h, w + 2 * padding), dtype=x.dtype, device=x.device)
        for s in range(2 * padding + 1):
            sel = (dy == s).nonzero().flatten()
            if len(sel):
                rows[sel] = padded[sel, :, s : s + h, :]
        out = torch.empty_like(x)
        for s in range(2 * padding + 1):
            sel = (dx == s).nonzero().flatten()
            if len(sel):
                out[sel] = rows[sel, :, :, s : s + w]
        return out

    @staticmethod
    def random_flip(x: torch.Tensor) -> torch.Tensor:
        mask = torch.rand(x.shape[0], device=x.device) < 0.5
        return torch.where(mask[:, None, None, None], x.flip(3), x)

    def forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"BatchTransform expects uint8 images, got {x.dtype}")
        if train:
            x = self.random_crop(x, self.crop_padding)
            if self.flip:
                x = self.random_flip(x)
        x = (x.float() - self.mean.to(x.device)) / self.std.to(x.device)
        if self.input_size and self.input_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return x
