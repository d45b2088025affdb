"""Per-class k-means index and the neighbourhood batch sampler's rules."""
import logging

import pytest
import torch

from src.data.neighbourhood_sampler import (
    NeighbourhoodBatchSampler,
    seed_probabilities,
    size_quota,
    split_quota,
)
from src.models.components.cluster_index import ClusterState, build_cluster_index


def blobs(per_class=(40, 40, 40), dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    centres = torch.randn(len(per_class), dim, generator=g) * 5
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_k_clusters_per_class_single_label_no_empty():
    emb, labels = blobs()
    index = build_cluster_index(emb, labels, k=4, seed=0)
    assert index.num_clusters == 12
    assert torch.bincount(index.centroid_labels).tolist() == [4, 4, 4]
    for c, members in enumerate(index.members):
        assert len(members) > 0
        assert torch.all(labels[members] == index.centroid_labels[c])
        assert torch.allclose(index.centroids[c], emb[members].mean(0), atol=1e-5)
    # variance: mean squared distance to the own centroid with the N-1 denominator
    ref = sum(float(((emb[i] - index.centroids[index.assignments[i]]) ** 2).sum()) for i in range(len(emb))) / (len(emb) - 1)
    assert index.variance == pytest.approx(ref, rel=1e-4)


def test_small_class_gets_fewer_clusters_with_warning(caplog):
    emb, labels = blobs(per_class=(40, 3, 1))
    with caplog.at_level(logging.WARNING):
        index = build_cluster_index(emb, labels, k=4, seed=0)
    assert torch.bincount(index.centroid_labels).tolist() == [4, 3, 1]
    assert "class 1 has only 3 training images" in caplog.text and "class 2 has only 1" in caplog.text
    assert all(len(m) > 0 for m in index.members)


def test_duplicate_points_never_leave_an_empty_cluster():
    emb = torch.zeros(20, 3)
    emb[10:] = 1.0
    labels = torch.zeros(20, dtype=torch.long)
    labels[10:] = 1
    index = build_cluster_index(emb, labels, k=5, seed=0)
    assert all(len(m) > 0 for m in index.members)
    assert index.assignments.max() < index.num_clusters


def test_clustering_is_deterministic_under_a_seed():
    emb, labels = blobs(per_class=(200, 200), dim=8)
    a = build_cluster_index(emb, labels, k=5, seed=3)
    b = build_cluster_index(emb, labels, k=5, seed=3)
    assert torch.equal(a.assignments, b.assignments) and torch.equal(a.centroids, b.centroids)


def test_impostor_ranking_is_other_classes_nearest_first():
    emb, labels = blobs()
    index = build_cluster_index(emb, labels, k=3, seed=0)
    for c in range(index.num_clusters):
        row = index.impostor_ranking[c]
        row = row[row >= 0]
        assert len(row) == 6 and torch.all(index.centroid_labels[row] != index.centroid_labels[c])
        d = ((index.centroids[row] - index.centroids[c]) ** 2).sum(1)
        assert torch.all(d[1:] >= d[:-1] - 1e-5)


def make_sampler(m=3, d=4, per_class=(40, 40, 40), k=3, random_clusters=0):
    emb, labels = blobs(per_class)
    state = ClusterState(len(labels))
    state.index = build_cluster_index(emb, labels, k=k, seed=0)
    return NeighbourhoodBatchSampler(state, len(labels), m, d, seed=0, random_clusters=random_clusters), state, labels


def test_batches_hold_m_distinct_clusters_of_d_images_with_foreign_impostors():
    sampler, state, labels = make_sampler(m=3, d=4)
    index = state.index
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        clusters = sampler.choose_clusters(g)
        assert len(set(clusters.tolist())) == 3
        seed = clusters[0]
        assert torch.all(index.centroid_labels[clusters[1:]] != index.centroid_labels[seed])
        # impostors are the seed's nearest other-class clusters
        ranking = index.impostor_ranking[seed]
        assert clusters[1:].tolist() == ranking[:2].tolist()
    batches = list(sampler)
    assert len(batches) == len(sampler) == -(-120 // 12)
    for batch in batches:
        assert len(batch) == 12
        cids = index.assignments[batch].view(3, 4)
        assert torch.all(cids == cids[:, :1])  # D consecutive images share a cluster
        assert len(set(cids[:, 0].tolist())) == 3
        for row in batch.view(3, 4):  # large clusters: D distinct images, no replacement
            assert len(set(row.tolist())) == 4


def test_small_clusters_are_sampled_with_replacement():
    sampler, state, _ = make_sampler(m=2, d=10, per_class=(3, 3), k=1)
    g = torch.Generator().manual_seed(0)
    batch = sampler.sample_batch(g)
    assert len(batch) == 20
    for row in batch.view(2, 10):
        assert len(set(row.tolist())) <= 3


def test_random_clusters_replace_some_nearest_impostors():
    sampler, state, _ = make_sampler(m=4, d=2, k=3, random_clusters=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        clusters = sampler.choose_clusters(g)
        ranking = state.index.impostor_ranking[clusters[0]]
        assert clusters[1] == ranking[0]  # one nearest
        assert set(clusters[2:].tolist()) <= set(ranking[1:].tolist())  # the rest from the other impostors
        assert len(set(clusters.tolist())) == 4


def test_seed_cluster_drawn_in_proportion_to_loss():
    sampler, state, labels = make_sampler(m=2, d=2, k=1)
    state.example_losses[:] = float("nan")
    state.example_losses[labels == 0] = 9.0
    state.example_losses[labels == 1] = 1.0  # class 2 unmeasured -> mean of measured = 5
    losses = state.cluster_losses()
    assert losses.tolist() == pytest.approx([9.0, 1.0, 5.0])
    probs = seed_probabilities(losses, floor=0.0)
    assert probs.tolist() == pytest.approx([0.6, 1 / 15, 1 / 3])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.stack([sampler.choose_clusters(g)[0] for _ in range(3000)]), minlength=3)
    assert abs(counts[0] / 3000 - 0.6) < 0.04 and abs(counts[1] / 3000 - 1 / 15) < 0.03


def test_total_loss_seeds_clusters_in_proportion_to_mean_loss_times_size():
    # a memory-like class of 8 images beside two classes of 80: with mean-loss seeding every image of the
    # small class would be drawn far more often than the others
    emb, labels = blobs((80, 80, 8))
    state = ClusterState(len(labels))
    state.index = build_cluster_index(emb, labels, k=1, seed=0)
    state.example_losses[:] = torch.where(labels == 0, 2.0, 1.0)
    sizes = state.index.cluster_sizes()
    assert sizes.tolist() == [80, 80, 8]
    # slow reference: the summed loss of each cluster's members, normalised
    total = torch.tensor([float(state.example_losses[state.index.assignments == c].sum()) for c in range(3)])
    probs = seed_probabilities(state.cluster_losses(), floor=0.0, cluster_sizes=sizes)
    assert probs.tolist() == pytest.approx((total / total.sum()).tolist())
    g = torch.Generator().manual_seed(0)
    for weight, expected in (("total_loss", total / total.sum()), ("mean_loss", torch.tensor([0.5, 0.25, 0.25]))):
        sampler = NeighbourhoodBatchSampler(state, len(labels), 2, 4, seed_weight=weight, loss_floor=0.0)
        counts = torch.bincount(torch.stack([sampler.choose_clusters(g)[0] for _ in range(3000)]), minlength=3)
        assert torch.allclose(counts / 3000, expected, atol=0.03), weight


def slow_size_quota(total, sizes, power, floor=2):
    """Reference: targets max(floor, c * size**power) with c found by bisection so they sum to ``total``,
    then one image at a time to the cluster furthest below its target (the earliest on ties)."""
    w = [float(n) ** power for n in sizes]
    lo, hi = 0.0, float(total)
    for _ in range(200):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if sum(max(floor, c * x) for x in w) < total else (lo, c)
    target = [max(floor, hi * x) for x in w]
    quota = [floor] * len(sizes)
    for _ in range(total - floor * len(sizes)):
        deficit = [t - q for t, q in zip(target, quota)]
        quota[deficit.index(max(deficit))] += 1
    return quota


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_size_quota_matches_a_slow_reference(power):
    g = torch.Generator().manual_seed(0)
    cases = [[62, 500, 500, 62, 62, 62], [500, 500], [30, 500, 40], [1, 1000, 1, 1, 1, 1], [7] * 6]
    cases += [torch.randint(1, 600, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
              for _ in range(40)]
    for sizes in cases:
        for total in (48, 50, 60):
            quota = size_quota(total, torch.tensor(sizes), power)
            assert quota == slow_size_quota(total, sizes, power), (sizes, total)
            assert sum(quota) == total and min(quota) >= 2
    # equal sizes, or power 0: the equal share, seed cluster first
    assert size_quota(50, torch.tensor([7] * 6), 1.0) == split_quota(50, 6) == [9, 9, 8, 8, 8, 8]
    assert size_quota(48, torch.tensor([62, 500, 500, 62, 62, 62]), 0.0) == [8] * 6
    # continual_5x2's last increment: a 62-image memory cluster beside two new classes of 500
    assert size_quota(48, torch.tensor([62, 500, 500, 62, 62, 62]), 0.5) == [5, 14, 14, 5, 5, 5]


def test_size_quota_draws_new_images_more_often_and_keeps_equal_clusters_identical():
    # a memory-like class of 10 beside two classes of 120 (K = 1): per-image draws an epoch
    emb, labels = blobs((120, 120, 10))
    state = ClusterState(len(labels))
    state.index = build_cluster_index(emb, labels, k=1, seed=0)
    rates = {}
    for power in (0.0, 1.0):
        sampler = NeighbourhoodBatchSampler(state, len(labels), 3, 8, quota_power=power)
        drawn = torch.cat(list(sampler))
        assert all(len(b) == 24 for b in sampler)
        counts = torch.bincount(drawn, minlength=len(labels)).double()
        rates[power] = counts[labels < 2].mean() / counts[labels == 2].mean()
    # equal shares draw each memory image 12x as often as a large-class image; shares by size come close to even
    assert rates[0.0] < 0.15 and rates[1.0] > 0.4
    # clusters of equal size: the same batches whatever the power (continual joint, naive and distill unchanged)
    emb, labels = blobs((40, 40, 40))
    state.index = build_cluster_index(emb, labels, k=1, seed=0)
    batches = [list(NeighbourhoodBatchSampler(state, len(labels), 3, 4, quota_power=p)) for p in (0.0, 0.5)]
    assert all(torch.equal(a, b) for a, b in zip(*batches))


def test_probability_floor_never_all_zero():
    probs = seed_probabilities(torch.zeros(4))
    assert torch.allclose(probs, torch.full((4,), 0.25))
    probs = seed_probabilities(torch.tensor([0.0, 0.0, 2.0]))
    assert torch.all(probs > 0) and probs.sum() == pytest.approx(1.0)


def test_random_batches_before_the_first_index():
    state = ClusterState(50)
    sampler = NeighbourhoodBatchSampler(state, 50, m=2, d=5)
    batches = list(sampler)
    assert len(batches) == 5 and all(len(b) == 10 and len(set(b.tolist())) == 10 for b in batches)


def test_permutation_warmup_batches_are_softmax_batches_topped_up():
    """``permutation``: the reference is softmax's own sampler on the same stream; every image once an epoch, the
    short last batch filled from the next permutation, and a fresh permutation each epoch."""
    from src.data.loaders import RandomBatchSampler

    n, m, d = 53, 2, 5
    sampler = NeighbourhoodBatchSampler(ClusterState(n), n, m, d, seed=7, increment=1, warmup_batches="permutation")
    reference = RandomBatchSampler(n, m * d, seed=7, increment=1)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        reference.set_epoch(epoch)
        batches, expected = list(sampler), list(reference)
        assert len(batches) == len(expected) == 6 and all(len(b) == m * d for b in batches)
        for ours, theirs in zip(batches[:-1], expected[:-1]):
            assert torch.equal(ours, theirs)
        assert torch.equal(batches[-1][:3], expected[-1])  # 53 = 5 x 10 + 3
        seen = torch.cat(batches[:-1] + [batches[-1][:3]])
        assert sorted(seen.tolist()) == list(range(n))
        assert len(set(batches[-1].tolist())) == m * d  # the top-up comes from a new permutation: no repeats
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert not torch.equal(torch.cat(first), torch.cat(list(sampler)))


def test_permutation_warmup_ranks_share_one_epoch_disjointly():
    n = 40
    a, b = (torch.cat(list(NeighbourhoodBatchSampler(ClusterState(n), n, 2, 5, seed=3, rank=r, world_size=2,
                                                      warmup_batches="permutation"))) for r in (0, 1))
    assert len(a) == len(b) == 20
    assert sorted(torch.cat([a, b]).tolist()) == list(range(n))


def test_iid_warmup_batches_leave_images_out():
    """The default ``iid`` warm-up draws each batch afresh: over an epoch some images repeat and some are missed."""
    n = 200
    seen = torch.cat(list(NeighbourhoodBatchSampler(ClusterState(n), n, 2, 10, seed=0)))
    assert len(seen) == n and len(set(seen.tolist())) < n


def test_ranks_draw_different_batches():
    emb, labels = blobs()
    state = ClusterState(len(labels))
    state.index = build_cluster_index(emb, labels, k=3, seed=0)
    a = list(NeighbourhoodBatchSampler(state, len(labels), 3, 4, rank=0, world_size=2))
    b = list(NeighbourhoodBatchSampler(state, len(labels), 3, 4, rank=1, world_size=2))
    assert len(a) == len(b) == 5
    assert any(not torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kw, match", [({"m": 1}, "M must be >= 2"), ({"d": 0}, "D must be >= 1"),
                                       ({"random_clusters": 3}, "random_clusters"),
                                       ({"seed_weight": "size"}, "model.clusters.seed_weight must be one of"),
                                       ({"quota_power": 2.0}, "model.clusters.quota_power must be in"),
                                       ({"warmup_batches": "shuffle"}, "model.clusters.warmup_batches must be one of")])
def test_invalid_sampler_settings(kw, match):
    args = {"m": 3, "d": 2, **kw}
    with pytest.raises(ValueError, match=match):
        NeighbourhoodBatchSampler(ClusterState(10), 10, **args)


def test_continual_experiment_shares_batches_by_square_root_size(make_cfg):
    """continual_5x2 sets model.clusters.quota_power; the magnet module hands it to the sampler it builds."""
    import hydra

    model = hydra.utils.instantiate(make_cfg("experiment=continual_5x2", "data=fake").model)
    sampler = model.train_batch_sampler(100, seed=0, increment=1, rank=0, world_size=1)
    assert sampler.quota_power == 0.5 and sampler.batch_size == 48
    default = hydra.utils.instantiate(make_cfg("experiment=magnet_cifar10", "data=fake").model)
    assert default.train_batch_sampler(100, seed=0, increment=None, rank=0, world_size=1).quota_power == 0.0


def test_warmup_batches_reach_the_sampler_from_the_config(make_cfg):
    import hydra

    def sampler_of(*overrides):
        model = hydra.utils.instantiate(make_cfg("experiment=magnet_cifar10", "data=fake", *overrides).model)
        return model.train_batch_sampler(100, seed=0, increment=None, rank=0, world_size=1)

    assert sampler_of().warmup_batches == "iid"  # the faithful default's (the paper draws no permutation)
    assert sampler_of("model.clusters.warmup_batches=permutation").warmup_batches == "permutation"
    hybrid = hydra.utils.instantiate(make_cfg("experiment=magnet_cifar10_hybrid", "data=fake").model)
    assert hybrid.train_batch_sampler(100, seed=0, increment=None, rank=0, world_size=1).warmup_batches == "permutation"
