import math

import pytest
import torch

from src.utils.metrics import attribute_concentration, attribute_matrix, retrieval_metrics, stratified_sample


def test_attribute_matrix_from_table():
    m = attribute_matrix({"a": [0, 2], "b": [1]}, 3)
    assert m.tolist() == [[True, False], [False, True], [True, False]]


def hand_example():
    # 1-D embedding, 4 images: classes 0,0,1,2 at positions 0, 1, 2, 10.
    # attributes: "x" = classes {0, 1}, "y" = class {2}
    emb = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    labels = torch.tensor([0, 0, 1, 2])
    attrs = attribute_matrix({"x": [0, 1], "y": [2]}, 3)
    return emb, labels, attrs


def test_attribute_concentration_by_hand():
    emb, labels, attrs = hand_example()
    # k=1 neighbours (self excluded): 0->1, 1->0 or 2 (tie at distance 1: topk picks one), 2->1, 3->2
    # use k=2 to avoid ties: 0->{1,2}, 1->{0,2}, 2->{1,0}, 3->{2,1}
    # attribute x (images 0,1,2): fractions 1, 1, 1 -> 1.0; attribute y (image 3): 0/2 -> 0.0
    assert attribute_concentration(emb, labels, attrs, k=2) == pytest.approx(0.5)
    # cross-class: only neighbours of other classes. image 0 -> {2 (cls1), 3}: x-fraction 1/2;
    # image 1 -> {2, 3}: 1/2; image 2 -> {1, 0}: 1; x: mean(0.5, 0.5, 1) = 2/3. image 3 -> {2, 1}: y 0.
    assert attribute_concentration(emb, labels, attrs, k=2, cross_class=True) == pytest.approx((2 / 3 + 0) / 2)


def test_attribute_concentration_against_slow_loop():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(30, 3, generator=g)
    labels = torch.randint(0, 4, (30,), generator=g)
    attrs = attribute_matrix({"p": [0, 1], "q": [1, 2, 3], "r": [3]}, 4)
    for cross in (False, True):
        total = []
        for a in range(3):
            vals = []
            for i in range(30):
                if not attrs[labels[i], a]:
                    continue
                cands = [j for j in range(30) if j != i and (not cross or labels[j] != labels[i])]
                cands.sort(key=lambda j: float(((emb[i] - emb[j]) ** 2).sum()))
                vals.append(sum(bool(attrs[labels[j], a]) for j in cands[:5]) / 5)
            total.append(sum(vals) / len(vals))
        assert attribute_concentration(emb, labels, attrs, k=5, cross_class=cross) == pytest.approx(sum(total) / 3)


def test_retrieval_metrics_perfect_and_random():
    labels = torch.arange(4).repeat_interleave(10)
    emb = torch.nn.functional.one_hot(labels, 4).float() * 10 + 0.01 * torch.randn(40, 4)
    m = retrieval_metrics(emb, labels, emb + 0.001, labels)
    assert m["knn_acc"] == 1.0 and m["map_at_r"] == pytest.approx(1.0)
    assert m["nmi"] > 0.75  # PML's NMI runs k-means on the queries, which may merge two of 4 tiny blobs
    shuffled = labels[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    m2 = retrieval_metrics(emb, shuffled, emb, labels)
    assert m2["map_at_r"] < 0.6 and m2["nmi"] < m["nmi"] and not math.isnan(m2["knn_acc"])


def test_stratified_sample():
    labels = torch.tensor([0] * 50 + [1] * 5)
    pick = stratified_sample(labels, 10)
    assert torch.bincount(labels[pick]).tolist() == [10, 5]
