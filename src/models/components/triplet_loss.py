"""Semi-hard triplet loss with static shapes: every (anchor, positive, negative) triplet of the batch at once.

It computes what pytorch-metric-learning's ``TripletMarginMiner(type_of_triplets="semihard")`` followed by
``TripletMarginLoss`` (Euclidean distance on L2-normalised embeddings, ``AvgNonZeroReducer``) computes, and is
tested against that pair. The library selects triplets with ``nonzero`` and boolean indexing, whose result
shapes depend on the values, so every step would wait for the device and CUDA graphs could not capture it;
here the selection is a mask over the [B, B, B] cube (2 M entries at B = 128, a few MB) and the reduction a
masked sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def semihard_triplet_losses(embeddings: torch.Tensor, labels: torch.Tensor, margin: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-triplet losses ``relu(d(a,p) - d(a,n) + margin)`` on the [B, B, B] cube (anchor, positive, negative)
    and the mask of the semi-hard triplets: same label for (a, p), a != p, another label for n, and
    ``0 < d(a,n) - d(a,p) <= margin``."""
    e = F.normalize(embeddings.float(), p=2, dim=1)
    dist = torch.cdist(e, e, p=2)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    gap = dist[:, None, :] - dist[:, :, None]  # gap[a, p, n] = d(a, n) - d(a, p)
    semihard = positive[:, :, None] & negative[:, None, :] & (gap > 0) & (gap <= margin)
    return F.relu(margin - gap), semihard


def average_nonzero(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the selected losses that are > 0; zero (still attached to the graph) when there is none."""
    counted = mask & (losses > 0)
    total = torch.where(counted, losses, torch.zeros_like(losses)).sum()
    count = counted.sum()
    return torch.where(count > 0, total / count.clamp_min(1), total * 0)


def semihard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    return average_nonzero(*semihard_triplet_losses(embeddings, labels, margin))
