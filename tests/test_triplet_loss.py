"""The static-shape semi-hard triplet loss against pytorch-metric-learning's miner + loss and a naive loop."""
import itertools

import pytest
import torch
from pytorch_metric_learning import losses, miners

from src.models.components.triplet_loss import semihard_triplet_loss
from src.utils.host_sync import forbid_host_syncs


def naive_semihard(emb, labels, margin):
    e = torch.nn.functional.normalize(emb, dim=1)
    kept = []
    for a, p, n in itertools.product(range(len(labels)), repeat=3):
        if a == p or labels[a] != labels[p] or labels[a] == labels[n]:
            continue
        d_ap, d_an = (e[a] - e[p]).norm(), (e[a] - e[n]).norm()
        if 0 < d_an - d_ap <= margin and d_ap - d_an + margin > 0:
            kept.append(d_ap - d_an + margin)
    return torch.stack(kept).mean() if kept else torch.zeros(())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_equals_the_library_and_a_naive_loop(seed, margin):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(12, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (12,), generator=g)
    library = losses.TripletMarginLoss(margin=margin)
    mined = miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")(emb, labels)
    expected = library(emb, labels, mined)
    ours = semihard_triplet_loss(emb, labels, margin)
    assert len(mined[0]) > 0 or seed  # at least the first case has semi-hard triplets to select
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, naive_semihard(emb.detach(), labels, margin), atol=1e-5, rtol=1e-5)
    # same gradients as the library's
    g_ours, = torch.autograd.grad(ours, emb)
    g_lib, = torch.autograd.grad(library(emb, labels, mined), emb)
    torch.testing.assert_close(g_ours, g_lib, atol=1e-5, rtol=1e-5)


def test_no_semihard_triplet_gives_an_attached_zero():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]], requires_grad=True)  # classes far apart
    loss = semihard_triplet_loss(emb, torch.tensor([0, 0, 1, 1]), 0.2)
    assert loss.item() == 0.0 and loss.requires_grad


def test_makes_no_host_sync():
    emb, labels = torch.randn(16, 8), torch.randint(0, 4, (16,))
    with forbid_host_syncs():
        semihard_triplet_loss(emb, labels, 0.2)
    with pytest.raises(RuntimeError), forbid_host_syncs():  # what the library's miner does
        miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")(emb, labels)
