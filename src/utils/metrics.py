"""Embedding-space evaluation: k-NN accuracy, NMI and MAP@R (pytorch-metric-learning), and the
attribute concentration of nearest neighbours."""
from __future__ import annotations

import numpy as np
import torch

# k-means inside PML's NMI and its k-NN both use FAISS when present.
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator


def attribute_matrix(table: dict[str, list[int]], num_classes: int) -> torch.Tensor:
    """[num_classes, num_attributes] bool: which class has which attribute."""
    names = list(table)
    m = torch.zeros(num_classes, len(names), dtype=torch.bool)
    for j, name in enumerate(names):
        for c in table[name]:
            m[int(c), j] = True
    return m


def _neighbours(emb: torch.Tensor, labels: torch.Tensor, k: int, cross_class: bool, chunk: int = 1024) -> torch.Tensor:
    """Indices [N, k] of each point's k nearest others (squared L2), optionally only among other classes."""
    emb = emb.float()
    out = []
    for start in range(0, len(emb), chunk):
        d = torch.cdist(emb[start : start + chunk], emb).pow(2)
        rows = torch.arange(start, min(start + chunk, len(emb)))
        d[torch.arange(len(rows)), rows] = float("inf")  # never count a point as its own neighbour
        if cross_class:
            d[labels[rows][:, None] == labels[None, :]] = float("inf")
        out.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def attribute_concentration(emb: torch.Tensor, labels: torch.Tensor, attributes: torch.Tensor, k: int,
                            cross_class: bool = False) -> float:
    """Mean over attributes of: mean over images whose class has the attribute, of the fraction of the
    image's k nearest neighbours (itself excluded; only other classes' images if ``cross_class``) whose
    class has it too. Attributes no image has are skipped."""
    n = len(labels)
    available = n - 1 if not cross_class else int(n - torch.bincount(labels).max())
    k = min(k, available)
    if k < 1:
        return float("nan")
    nbr = _neighbours(emb, labels, k, cross_class)
    has = attributes[labels]  # [N, A]
    nbr_has = attributes[labels[nbr]].float().mean(1)  # [N, A]: fraction of neighbours with each attribute
    per_attr = [nbr_has[has[:, a], a].mean() for a in range(attributes.shape[1]) if has[:, a].any()]
    return float(torch.stack(per_attr).mean()) if per_attr else float("nan")


def retrieval_metrics(query: torch.Tensor, query_labels: torch.Tensor, reference: torch.Tensor,
                      reference_labels: torch.Tensor) -> dict[str, float]:
    """knn_acc: 1-NN accuracy of queries against the reference (training) set; nmi and map_at_r of the
    query set against itself, all by pytorch-metric-learning's AccuracyCalculator."""
    q, ql = query.float().cpu(), query_labels.cpu()
    r, rl = reference.float().cpu(), reference_labels.cpu()
    knn = AccuracyCalculator(include=("precision_at_1",), k=1).get_accuracy(q, ql, r, rl, ref_includes_query=False)
    own = AccuracyCalculator(include=("NMI", "mean_average_precision_at_r"), k="max_bin_count").get_accuracy(
        q, ql, q, ql, ref_includes_query=True
    )
    return {"knn_acc": float(knn["precision_at_1"]), "nmi": float(own["NMI"]),
            "map_at_r": float(own["mean_average_precision_at_r"])}


def nearest_class_mean_accuracy(query: torch.Tensor, query_labels: torch.Tensor, reference: torch.Tensor,
                                reference_labels: torch.Tensor) -> float:
    """Accuracy of the nearest-class-mean read-out: each query takes the class whose mean reference embedding is
    nearest (squared L2). Classes without reference images are never predicted."""
    labels = reference_labels.cpu()
    num_classes = int(max(labels.max(), query_labels.max())) + 1 if len(labels) else 0
    means = class_means(reference.float().cpu(), labels, num_classes)
    return accuracy(nearest_mean_scores(query.float().cpu(), means), query_labels)


def accuracy(probs_or_logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs_or_logits.argmax(1).cpu() == labels.cpu()).float().mean()) if len(labels) else float("nan")


def stratified_sample(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks)


def to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def class_means(emb: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes, E]: the mean embedding of each class's rows of ``emb``; a class with no row gets a NaN row
    (``nearest_mean_scores`` never picks it). One scatter-add, no loop over classes."""
    emb = emb.float()
    sums = torch.zeros(num_classes, emb.shape[1], dtype=emb.dtype, device=emb.device).index_add_(0, labels, emb)
    counts = torch.bincount(labels, minlength=num_classes).to(emb.dtype)[:, None]
    return sums / counts  # 0 / 0 = NaN for an absent class


def nearest_mean_scores(emb: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """[N, C] scores of each row against each class mean: minus the squared Euclidean distance, -inf for a class
    whose mean is NaN (absent). Its argmax is the nearest mean; restricted to some columns, the nearest among them."""
    d = torch.cdist(emb.float(), torch.nan_to_num(means.float())).pow(2)
    return (-d).masked_fill(torch.isnan(means).any(1)[None, :], float("-inf"))


def nearest_mean_predict(emb: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """[N] the class of the nearest mean (``class_means``'s rows; NaN rows never win)."""
    return nearest_mean_scores(emb, means).argmax(1)
