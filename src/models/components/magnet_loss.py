"""Magnet loss (Rippel et al., ICLR 2016, eq. 5) and the magnet classification rule.

Every exponential is taken in log space (logsumexp / softmax), so far-away clusters cannot underflow
to 0 and give log(0). sigma^2 is a plain variance (no second squaring), and clusters of any size work.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check_batch(embeddings: Tensor, cluster_ids: Tensor, labels: Tensor) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [N, E], got shape {tuple(embeddings.shape)}")
    n = embeddings.shape[0]
    if cluster_ids.shape != (n,) or labels.shape != (n,):
        raise ValueError(f"cluster_ids and labels must be [N]={n}, got {tuple(cluster_ids.shape)} and {tuple(labels.shape)}")
    if n < 2:
        raise ValueError("magnet loss needs at least 2 examples in a batch to estimate the variance")


def batch_clusters(cluster_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each in-batch cluster's label and each example's in-batch cluster position (0..C-1), checking that
    no cluster mixes labels."""
    uniq, position = torch.unique(cluster_ids, return_inverse=True)
    cluster_labels = torch.full((len(uniq),), -1, dtype=labels.dtype, device=labels.device)
    cluster_labels.scatter_(0, position, labels)
    if not torch.equal(cluster_labels[position], labels):
        raise ValueError("every cluster must hold examples of a single label, but a cluster_id mixes labels")
    return cluster_labels, position


def magnet_loss_with_options(embeddings: Tensor, cluster_ids: Tensor, labels: Tensor, alpha: float = 1.0,
                             detach_variance: bool = False, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """The validating form: arbitrary cluster ids, and one-line errors for a batch the loss is not defined on."""
    _check_batch(embeddings, cluster_ids, labels)
    cluster_labels, position = batch_clusters(cluster_ids, labels)
    lacking = ~(cluster_labels[None, :] != labels[:, None]).any(1)
    if lacking.any():
        missing = sorted(set(labels[lacking].tolist()))
        raise ValueError(
            f"magnet loss needs a cluster of another class for every example, but examples of label(s) "
            f"{missing} have none in this batch; sample clusters from at least two classes"
        )
    losses, variance, _ = magnet_loss_indexed(embeddings, position, labels, cluster_labels, alpha, detach_variance, eps)
    return losses, variance


def magnet_loss_indexed(embeddings: Tensor, cluster_ids: Tensor, labels: Tensor, cluster_labels: Tensor,
                        alpha: float = 1.0, detach_variance: bool = False, eps: float = 1e-12,
                        impostor_classes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example losses and the batch variance for a batch drawn from a
    cluster index of C clusters (``cluster_ids`` in 0..C-1, ``cluster_labels`` [C] from the index).

    Shapes depend only on (N, C), never on which clusters the batch holds, and nothing is read back to
    the host: in-batch means are sums over all C clusters (absent ones have count 0 and are masked out),
    so the training step can be captured in a CUDA graph. The checks the validating version makes per
    batch hold by construction (one label per cluster: the index; an impostor for every example: the
    neighbourhood sampler); the third result flags, on the device, any example left without an impostor
    (its loss is set to 0 instead of NaN) for the caller to check every few steps.

    ``impostor_classes`` ([N, num_classes] booleans, optional) restricts each example's impostors to clusters of
    those classes (a continual strategy's asymmetric loss: a new class's image is contrasted with the new classes
    only)."""
    num_clusters = cluster_labels.shape[0]
    ones = torch.ones_like(cluster_ids, dtype=embeddings.dtype)
    counts = torch.zeros(num_clusters, device=embeddings.device, dtype=embeddings.dtype).index_add_(0, cluster_ids, ones)
    sums = torch.zeros(num_clusters, embeddings.shape[1], device=embeddings.device, dtype=embeddings.dtype)
    sums.index_add_(0, cluster_ids, embeddings)
    means = sums / counts.clamp_min(1)[:, None]
    # Exact squared distances (not the expanded |a|^2 - 2ab + |b|^2 form, which cancels badly when close).
    sq_dist = (embeddings[:, None, :] - means[None, :, :]).pow(2).sum(-1)  # [N, C]
    own = sq_dist.gather(1, cluster_ids[:, None]).squeeze(1)
    variance = own.sum() / (embeddings.shape[0] - 1)
    var_used = variance.detach() if detach_variance else variance
    scale = 1.0 / (2.0 * var_used.clamp_min(eps))
    impostor = (cluster_labels[None, :] != labels[:, None]) & (counts > 0)[None, :]
    lacking = ~impostor.any(1).all()  # the sampler's promise, checked before any restriction
    if impostor_classes is not None:  # a row left without an allowed impostor is meant to contribute 0
        impostor = impostor & impostor_classes[:, cluster_labels]
    has_impostor = impostor.any(1)
    # a row with no impostor would give logsumexp(-inf...) = -inf and NaN gradients: give it a finite row
    impostor = impostor | ~has_impostor[:, None]
    logits = (-sq_dist * scale).masked_fill(~impostor, float("-inf"))
    losses = torch.relu(own * scale + alpha + torch.logsumexp(logits, dim=1)) * has_impostor
    return losses, variance, lacking


def magnet_loss(embeddings: Tensor, cluster_ids: Tensor, labels: Tensor, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-example magnet losses after the hinge, [N], and the batch variance sigma^2 (a 0-d tensor)."""
    return magnet_loss_with_options(embeddings, cluster_ids, labels, alpha=alpha)


def magnet_predict(embeddings: Tensor, centroids: Tensor, centroid_labels: Tensor, variance: float,
                   num_classes: int, L: int) -> Tensor:
    """Class probabilities [Q, num_classes] from the L nearest centroids (all of them if L > C)."""
    variance = float(variance)
    if not variance > 0:
        raise ValueError(f"variance must be > 0, got {variance}")
    if L < 1:
        raise ValueError(f"L must be >= 1, got {L}")
    if centroids.shape[0] == 0:
        raise ValueError("magnet_predict needs at least one centroid")
    sq_dist = torch.cdist(embeddings.float(), centroids.float()).pow(2)
    k = min(L, centroids.shape[0])
    nearest_dist, nearest = sq_dist.topk(k, dim=1, largest=False)
    weights = torch.softmax(-nearest_dist / (2.0 * variance), dim=1)  # log-space: no underflow to 0/0
    probs = torch.zeros(embeddings.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return probs.scatter_add_(1, centroid_labels.to(weights.device)[nearest], weights)


class MagnetLoss(torch.nn.Module):
    """Reduces the per-example magnet losses to their mean; keeps the knobs that are not in the paper's API."""

    def __init__(self, alpha: float = 1.0, detach_variance: bool = False):
        super().__init__()
        if alpha < 0:
            raise ValueError(f"model.loss.alpha must be >= 0, got {alpha}")
        self.alpha, self.detach_variance = alpha, detach_variance

    def forward(self, embeddings: Tensor, cluster_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        losses, variance = magnet_loss_with_options(embeddings, cluster_ids, labels, self.alpha, self.detach_variance)
        return losses.mean(), losses, variance

    def indexed(self, embeddings: Tensor, cluster_ids: Tensor, labels: Tensor, cluster_labels: Tensor,
                impostor_classes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The training step's form (see ``magnet_loss_indexed``): mean, per-example losses, variance and
        the on-device flag for an example without impostor."""
        losses, variance, lacking = magnet_loss_indexed(embeddings, cluster_ids, labels, cluster_labels, self.alpha,
                                                        self.detach_variance, impostor_classes=impostor_classes)
        return losses.mean(), losses, variance, lacking
