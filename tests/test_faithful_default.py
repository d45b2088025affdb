"""experiment=magnet_cifar10 is the paper's method after its warm-up; the warm-up is a fraction of the run; the method's
epochs have a learning-rate cap; the read-outs and figures the evaluation adds."""
import math

import hydra
import pytest
import torch

from src.utils import metrics as M


def test_the_headline_experiment_composes_to_the_papers_method(make_cfg):
    cfg = make_cfg("experiment=magnet_cifar10")
    model = hydra.utils.instantiate(cfg.model)
    max_epochs = cfg.trainer.max_epochs
    assert model.ce_weight == 0  # after the warm-up the objective is the magnet loss alone
    assert model.K >= 2 and model.clusters_per_class(model.warmup_epochs_for(max_epochs), max_epochs) >= 2
    assert model.M < model.K * model.num_classes  # neighbourhood sampling selects: not every cluster in every batch
    assert model.random_clusters == 0 and model.seed_weight == "mean_loss"  # the paper's impostor rule
    assert max_epochs - model.warmup_epochs_for(max_epochs) >= 10  # at least 10 of the 50 epochs train magnet loss


def test_the_hybrid_keeps_its_own_name(make_cfg):
    model = hydra.utils.instantiate(make_cfg("experiment=magnet_cifar10_hybrid").model)
    assert model.ce_weight == 1.0 and model.M == model.K * model.num_classes
    assert model.warmup_epochs_for(50) == 45


@pytest.mark.parametrize("fraction, max_epochs, expected", [(0.8, 50, 40), (0.8, 4, 3), (0.9, 4, 3), (0.9, 10, 9),
                                                             (0.5, 1, 0), (0.0, 7, 0)])
def test_the_warmup_is_a_fraction_of_the_run(make_cfg, fraction, max_epochs, expected):
    model = hydra.utils.instantiate(make_cfg(f"model.warmup_fraction={fraction}", "model.warmup_epochs=null").model)
    assert model.warmup_epochs_for(max_epochs) == expected == math.floor(fraction * max_epochs + 1e-9)
    assert expected < max_epochs  # a fraction below 1 always leaves the method an epoch


@pytest.mark.parametrize("overrides, match", [
    (["model.warmup_fraction=0.8"], "model.warmup_epochs=5 and model.warmup_fraction=0.8 are both set"),
    (["model.warmup_fraction=1.0", "model.warmup_epochs=null"], r"model.warmup_fraction must be null or in \[0, 1\)"),
    (["model.lr_cap_after_warmup=0"], "model.lr_cap_after_warmup must be null or > 0"),
])
def test_bad_warmup_and_cap_settings_fail_in_one_line(make_cfg, overrides, match):
    with pytest.raises(Exception, match=match) as e:
        hydra.utils.instantiate(make_cfg(*overrides).model)
    root = e.value
    while root.__cause__ is not None:
        root = root.__cause__
    assert "\n" not in str(root)


def test_a_fraction_needs_a_finite_run(make_cfg):
    model = hydra.utils.instantiate(make_cfg("model.warmup_fraction=0.5", "model.warmup_epochs=null").model)
    with pytest.raises(ValueError, match="model.warmup_fraction needs a finite trainer.max_epochs"):
        model.warmup_epochs_for(-1)
    model.warmup_epochs = 3  # an absolute length (the continual runner's) replaces the fraction
    assert model.warmup_fraction is None and model.warmup_epochs_for(None) == 3


class _Scheduler:
    """The two things apply_lr_factor reads of a scheduler."""

    def __init__(self, lr):
        self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        self._lr = lr

    def get_last_lr(self):
        return [self._lr]


@pytest.mark.parametrize("epoch, scheduled, expected", [(0, 0.5, 0.5), (1, 0.5, 0.001), (1, 0.0004, 0.0004)])
def test_the_cap_bounds_the_rate_only_after_the_warmup(make_cfg, monkeypatch, epoch, scheduled, expected):
    model = hydra.utils.instantiate(make_cfg("model.warmup_epochs=1", "model.lr_cap_after_warmup=0.001").model)
    monkeypatch.setattr(type(model), "current_epoch", property(lambda self: epoch))
    sched = _Scheduler(scheduled)
    model.apply_lr_factor(sched)
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


@pytest.mark.parametrize("experiment", ["magnet_cifar10", "magnet_cifar10_hybrid"])
def test_the_cap_never_binds_in_a_full_length_run(make_cfg, experiment):
    """The measured 50-epoch results are those of the uncapped schedule: every rate after the warm-up is below it."""
    from src.models.components.phased_schedule import cycle_factors

    cfg = make_cfg(f"experiment={experiment}")
    model = hydra.utils.instantiate(cfg.model)
    epochs, steps_per_epoch = cfg.trainer.max_epochs, 5000 // (model.M * model.D)
    warmup = model.warmup_epochs_for(epochs)
    base = cfg.model.optimizer.lr
    make = hydra.utils.instantiate(cfg.model.scheduler)
    if model.schedule_per_phase:
        after = cycle_factors(make, base, (epochs - warmup) * steps_per_epoch)
    else:
        after = cycle_factors(make, base, epochs * steps_per_epoch)[warmup * steps_per_epoch:]
    rates = [f * base * model.lr_scale_after_warmup for f in after]
    assert max(rates) < model.lr_cap_after_warmup


def test_nearest_class_mean_accuracy_against_a_hand_computed_case():
    reference = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [10.0, 12.0]])
    reference_labels = torch.tensor([3, 3, 7, 7])  # class means (1, 0) and (10, 11)
    query = torch.tensor([[1.0, 1.0], [9.0, 9.0], [6.0, 5.0], [5.0, 6.0]])
    # distances to (1,0) and (10,11): [1, 181], [101, 5], [50, 61], [52, 41] -> classes 3, 7, 3, 7
    query_labels = torch.tensor([3, 7, 7, 7])
    assert M.nearest_class_mean_accuracy(query, query_labels, reference, reference_labels) == pytest.approx(0.75)


def test_each_test_point_is_marked_with_its_nearest_cluster_of_its_own_class(make_cfg):
    from src.models.components.cluster_index import ClusterIndex

    model = hydra.utils.instantiate(make_cfg().model)
    centroids = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    model.cluster_state.index = ClusterIndex(centroids, labels, torch.tensor([0, 1, 2, 3]), 1.0)
    emb = torch.tensor([[3.5, 0.0], [0.1, 0.0], [0.0, 3.9], [3.0, 0.5]])
    y = torch.tensor([0, 0, 1, 1])
    # the last point is nearest to class 0's second cluster, but is marked among class 1's: (4, 4) is its nearer
    assert model.own_class_cluster(emb, y).tolist() == [1, 0, 0, 1]
