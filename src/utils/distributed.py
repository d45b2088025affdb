"""Collectives shared by the models and the callbacks (kept here, below both, so neither imports the other)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch


def gather_uneven(module: pl.LightningModule, t: torch.Tensor) -> torch.Tensor:
    """all_gather for per-rank tensors whose first dimension differs by rank."""
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = module.all_gather(n).flatten().tolist()
    pad = max(sizes) - t.shape[0]
    padded = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t
    gathered = module.all_gather(padded)  # [world, max, ...]
    return torch.cat([gathered[r, : sizes[r]] for r in range(len(sizes))])
