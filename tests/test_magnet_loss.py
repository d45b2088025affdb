"""magnet_loss and magnet_predict against slow, obvious loops (paper eq. 5 and the magnet rule)."""
import math

import pytest
import pytorch_lightning as pl
import torch

from src.models.components.magnet_loss import MagnetLoss, magnet_loss, magnet_predict
from src.models.embed import batchnorm_layers


def reference_magnet_loss(r, cluster_ids, labels, alpha):
    r = r.double()
    n = len(r)
    clusters = sorted(set(cluster_ids.tolist()))
    mean = {c: sum(r[i] for i in range(n) if cluster_ids[i] == c) / sum(1 for i in range(n) if cluster_ids[i] == c)
            for c in clusters}
    label_of = {int(cluster_ids[i]): int(labels[i]) for i in range(n)}
    var = sum(float(((r[i] - mean[int(cluster_ids[i])]) ** 2).sum()) for i in range(n)) / (n - 1)
    losses = []
    for i in range(n):
        own = float(((r[i] - mean[int(cluster_ids[i])]) ** 2).sum())
        denom = sum(math.exp(-float(((r[i] - mean[c]) ** 2).sum()) / (2 * var))
                    for c in clusters if label_of[c] != int(labels[i]))
        losses.append(max(0.0, own / (2 * var) + alpha + math.log(denom)))
    return torch.tensor(losses, dtype=torch.float64), var


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 4.0])
def test_matches_reference(seed, alpha):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(12, 5, generator=g, dtype=torch.float64)
    cluster_ids = torch.tensor([7, 7, 7, 2, 2, 2, 40, 40, 9, 9, 9, 9])  # arbitrary ids, uneven sizes
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2])     # class 0 has two clusters
    losses, var = magnet_loss(r, cluster_ids, labels, alpha=alpha)
    ref, ref_var = reference_magnet_loss(r, cluster_ids, labels, alpha)
    assert losses.shape == (12,)
    assert torch.allclose(losses, ref, atol=1e-9)
    assert float(var) == pytest.approx(ref_var, rel=1e-12)


def test_inactive_and_active_hinge():
    # Two tight clusters far apart: every example is well inside its own cluster -> loss exactly 0.
    r = torch.tensor([[0.0, 0.1], [0.0, -0.1], [3.0, 0.1], [3.0, -0.1]], dtype=torch.float64)
    ids, labels = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1])
    losses, _ = magnet_loss(r, ids, labels, alpha=1.0)
    assert torch.all(losses == 0)
    ref, _ = reference_magnet_loss(r, ids, labels, 1.0)
    assert torch.equal(losses, ref.to(losses.dtype))
    # Overlapping clusters: the hinge is active and matches the reference.
    r2 = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.5, 1.0], [0.5, -1.0]], dtype=torch.float64)
    losses2, _ = magnet_loss(r2, ids, labels, alpha=1.0)
    ref2, _ = reference_magnet_loss(r2, ids, labels, 1.0)
    assert torch.all(losses2 > 0) and torch.allclose(losses2, ref2)


def test_far_impostors_do_not_underflow():
    # exp(-d/2var) underflows to 0 for all impostors in a naive implementation -> log(0) = -inf.
    r = torch.tensor([[0.0], [0.001], [1e4], [1e4 + 0.001]], dtype=torch.float32)
    losses, _ = magnet_loss(r, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]), alpha=1.0)
    assert torch.all(torch.isfinite(losses)) and torch.all(losses == 0)


def test_gradients_flow_and_are_finite():
    r = torch.randn(8, 4, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    losses, _ = magnet_loss(r, ids, ids // 2 * 0 + ids % 2 + ids // 2 * 2, alpha=1.0)
    losses.mean().backward()
    assert torch.all(torch.isfinite(r.grad)) and r.grad.abs().sum() > 0


def test_detached_variance_changes_gradient_not_value():
    r = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    ids = labels = torch.tensor([0, 0, 1, 1, 2, 2])
    a_mean, a_losses, a_var = MagnetLoss(1.0, detach_variance=False)(r, ids, labels)
    b_mean, b_losses, b_var = MagnetLoss(1.0, detach_variance=True)(r, ids, labels)
    assert torch.allclose(a_losses, b_losses) and torch.equal(a_var, b_var)
    ga, = torch.autograd.grad(a_mean, r)
    gb, = torch.autograd.grad(b_mean, r)
    assert not torch.allclose(ga, gb)


def test_mixed_label_cluster_is_rejected():
    with pytest.raises(ValueError, match="single label"):
        magnet_loss(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))


def test_batch_without_impostor_cluster_is_rejected():
    with pytest.raises(ValueError, match="cluster of another class"):
        magnet_loss(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), torch.tensor([3, 3, 3, 3]))


def test_negative_alpha_is_rejected():
    with pytest.raises(ValueError, match="alpha"):
        MagnetLoss(alpha=-1)


def reference_predict(r, centroids, centroid_labels, var, num_classes, L):
    out = torch.zeros(len(r), num_classes, dtype=torch.float64)
    for q in range(len(r)):
        d = [float(((r[q] - c) ** 2).sum()) for c in centroids]
        nearest = sorted(range(len(d)), key=lambda i: d[i])[:L]
        w = {i: math.exp(-d[i] / (2 * var)) for i in nearest}
        total = sum(w.values())
        for i in nearest:
            out[q, int(centroid_labels[i])] += w[i] / total
    return out


@pytest.mark.parametrize("L", [1, 2, 4, 100])
def test_predict_matches_reference(L):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(7, 3, generator=g, dtype=torch.float64)
    centroids = torch.randn(6, 3, generator=g, dtype=torch.float64)
    centroid_labels = torch.tensor([0, 0, 1, 2, 2, 3])
    probs = magnet_predict(r, centroids, centroid_labels, variance=0.7, num_classes=5, L=L)
    ref = reference_predict(r, centroids, centroid_labels, 0.7, 5, L)
    assert probs.shape == (7, 5)
    assert torch.allclose(probs.double(), ref, atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(7, dtype=probs.dtype), atol=1e-5)
    assert torch.all(probs[:, 4] == 0)  # a class with no centroid never gets probability


def test_predict_survives_tiny_variance():
    probs = magnet_predict(torch.tensor([[0.0], [9.0]]), torch.tensor([[1.0], [10.0]]), torch.tensor([0, 1]),
                           variance=1e-6, num_classes=2, L=2)
    assert torch.all(torch.isfinite(probs))
    assert probs.argmax(1).tolist() == [0, 1]


def test_predict_rejects_bad_arguments():
    with pytest.raises(ValueError, match="variance"):
        magnet_predict(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), 0.0, 2, 1)
    with pytest.raises(ValueError, match="L must be"):
        magnet_predict(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), 1.0, 2, 0)


def test_indexed_loss_equals_the_validating_loss_without_host_syncs():
    from src.models.components.magnet_loss import magnet_loss_indexed, magnet_loss_with_options
    from src.utils.host_sync import forbid_host_syncs

    g = torch.Generator().manual_seed(0)
    cluster_labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # an index of 8 clusters, 2 per class
    for _ in range(5):
        # a batch holding 4 of the 8 clusters (of at least two classes), D = 3 each
        present = torch.randperm(8, generator=g)[:4]
        if len(set(cluster_labels[present].tolist())) < 2:
            continue
        ids = present.repeat_interleave(3)
        emb = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
        labels = cluster_labels[ids]
        for detach in (False, True):
            ref, ref_var = magnet_loss_with_options(emb, ids, labels, alpha=0.7, detach_variance=detach)
            with forbid_host_syncs():
                fast, var, lacking = magnet_loss_indexed(emb, ids, labels, cluster_labels, alpha=0.7,
                                                         detach_variance=detach)
            assert torch.allclose(fast, ref, atol=1e-10) and torch.allclose(var, ref_var) and not lacking
            g_ref, = torch.autograd.grad(ref.mean(), emb)
            g_fast, = torch.autograd.grad(fast.mean(), emb)
            assert torch.allclose(g_fast, g_ref, atol=1e-10)


def test_indexed_loss_flags_an_example_without_impostor_instead_of_nan():
    from src.models.components.magnet_loss import magnet_loss_indexed

    emb = torch.randn(6, 3, requires_grad=True)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])  # both clusters of class 0: nobody has an impostor
    losses, _, lacking = magnet_loss_indexed(emb, ids, torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 1]))
    assert bool(lacking) and torch.equal(losses, torch.zeros(6))
    losses.sum().backward()
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_module_loss_is_magnet_plus_weighted_cross_entropy(ce_weight):
    """model.ce_weight adds ce_weight x cross-entropy of the classifier head to the magnet loss of the same batch
    (reference computed by hand from the same embeddings); 0 leaves the paper's loss alone."""
    from pathlib import Path

    import hydra
    import torch.nn.functional as F

    from src.models.components.cluster_index import build_cluster_index
    from tests.conftest import compose

    cfg = compose(["model.warmup_epochs=0", "model.warmup_fraction=null", "model.clusters.split_fraction=null", "model.clusters.K=2",
                   f"model.ce_weight={ce_weight}"], Path("/tmp/unused"))
    model = hydra.utils.instantiate(cfg.model).eval()  # eval: BatchNorm gives the same embeddings on every call
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.arange(3).repeat_interleave(4)
    with torch.no_grad():
        emb = model(x)
    model.cluster_state.index = build_cluster_index(emb, y, k=2, seed=0)
    pos = torch.arange(12)
    loss = model.training_step((x, y, pos), 0)

    assignments, cluster_labels = model.cluster_state.index_on(emb.device)
    magnet, *_ = model.loss.indexed(emb, assignments[pos], y, cluster_labels)
    expected = magnet + ce_weight * F.cross_entropy(model.net.classifier(emb), y)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    assert (model.classifier_logits(emb) is not None) == (ce_weight > 0)


def test_negative_ce_weight_is_rejected():
    from pathlib import Path

    import hydra
    from hydra.errors import InstantiationException

    from tests.conftest import compose

    with pytest.raises(InstantiationException, match="model.ce_weight must be >= 0"):
        hydra.utils.instantiate(compose(["model.ce_weight=-1"], Path("/tmp/unused")).model)


class RecordTrainingSteps(pl.Callback):
    """Per training step of the last run it was part of: (epoch, the learning rate the step uses, are all
    BatchNorm layers in training mode, sum of their running means before the step, after the step)."""
    steps: list[tuple[int, float, bool, float, float]] = []

    def on_fit_start(self, trainer, module):
        RecordTrainingSteps.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._before = sum(float(m.running_mean.sum()) for m in batchnorm_layers(module))
        self._lr = trainer.optimizers[0].param_groups[0]["lr"]  # the scheduler steps after the optimizer

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        bns = batchnorm_layers(module)
        RecordTrainingSteps.steps.append((trainer.current_epoch, self._lr,
                                          all(m.training for m in bns), self._before,
                                          sum(float(m.running_mean.sum()) for m in bns)))


def run_fake_magnet(tmp_path, *overrides):
    from src.train import train
    from tests.conftest import compose

    train(compose(["experiment=magnet_cifar10", "data=fake", "data.subset_size=null", "callbacks.rich_progress_bar=null",
                   "model.evaluation.tsne=false", "trainer.max_epochs=3", "model.warmup_epochs=1", "model.warmup_fraction=null",
                   "model.clusters.M=4", "model.clusters.D=4", "test=false", "model.optimizer.lr=0.01",
                   "model.schedule_per_phase=false", "model.lr_scale_after_warmup=1.0",
                   # the schedule's own rates, uncapped (the cap has its own tests in test_faithful_default.py)
                   "model.lr_cap_after_warmup=null",
                   "+callbacks.record_steps._target_=tests.test_magnet_loss.RecordTrainingSteps", *overrides], tmp_path))
    return RecordTrainingSteps.steps


@pytest.fixture(scope="module")
def plain_and_fine_tuned_runs(tmp_path_factory):
    """The same fake run twice: the paper's settings, and with the magnet phase's rate scaled and BN frozen."""
    tmp = tmp_path_factory.mktemp("magnet_phase")
    plain = run_fake_magnet(tmp / "plain", "model.lr_scale_after_warmup=1.0", "model.bn_mode=batch")
    tuned = run_fake_magnet(tmp / "tuned", "model.lr_scale_after_warmup=0.1", "model.bn_mode=frozen")
    return plain, tuned


def one_cycle_rates(steps: int, max_lr: float, pct_start: float) -> list[float]:
    """torch's OneCycleLR over ``steps`` steps, read off a one-parameter optimizer: the reference."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, pct_start=pct_start, total_steps=steps)
    rates = []
    for i in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        if i + 1 < steps:
            opt.step()
            sched.step()
    return rates


def test_phased_schedule_runs_the_scheduler_once_per_phase():
    import functools

    from src.models.components.phased_schedule import phased_schedule

    opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.05, momentum=0.9)
    sched = phased_schedule(opt, functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.05, pct_start=0.3),
                            [13, 21])
    rates = []
    for _ in range(13 + 21 + 3):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = one_cycle_rates(13, 0.05, 0.3) + one_cycle_rates(21, 0.05, 0.3)
    assert rates[:34] == pytest.approx(expected, rel=1e-9)
    assert rates[34:] == pytest.approx([expected[-1]] * 3, rel=1e-9)  # past the last phase: its final rate
    assert rates[12] < 1e-4 < rates[13]  # annealed at the end of the first phase, restarted at the second
    with pytest.raises(ValueError, match="at least one step"):
        phased_schedule(opt, functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.05), [5, 0])


def test_schedule_per_phase_anneals_the_warmup_and_restarts_for_magnet_loss(tmp_path):
    """model.schedule_per_phase: in a real (fake-data) run, the warm-up steps follow OneCycle over the warm-up
    alone and the magnet steps a new OneCycle over the magnet epochs, times lr_scale_after_warmup."""
    steps = run_fake_magnet(tmp_path, "model.lr_scale_after_warmup=0.1", "model.schedule_per_phase=true")
    warmup = [lr for epoch, lr, *_ in steps if epoch == 0]
    magnet = [lr for epoch, lr, *_ in steps if epoch >= 1]
    assert len(magnet) == 2 * len(warmup) > 20
    lr, pct = 0.01, 0.2  # run_fake_magnet's rate, conf/model/scheduler/onecycle.yaml
    assert warmup == pytest.approx(one_cycle_rates(len(warmup), lr, pct), rel=1e-9)
    assert magnet == pytest.approx([0.1 * r for r in one_cycle_rates(len(magnet), lr, pct)], rel=1e-9)


def test_softmax_takes_the_same_two_phase_schedule_as_the_control_for_magnet(tmp_path):
    """The softmax baseline with model.warmup_epochs, schedule_per_phase and lr_scale_after_warmup: the same
    two one-cycles as magnet's (the second scaled), with cross-entropy and batch-statistics BatchNorm in both
    phases, so it isolates what the magnet loss adds to the fine-tuning phase."""
    from src.train import train
    from tests.conftest import compose

    train(compose(["experiment=softmax_cifar10", "data=fake", "data.subset_size=null", "callbacks.rich_progress_bar=null",
                   "model.evaluation.tsne=false", "trainer.max_epochs=3", "model.warmup_epochs=1", "model.warmup_fraction=null", "test=false",
                   "data.batch_size=16", "model.schedule_per_phase=true", "model.lr_scale_after_warmup=0.1",
                   "+callbacks.record_steps._target_=tests.test_magnet_loss.RecordTrainingSteps"], tmp_path))
    steps = RecordTrainingSteps.steps
    first = [lr for epoch, lr, *_ in steps if epoch == 0]
    second = [lr for epoch, lr, *_ in steps if epoch >= 1]
    assert len(second) == 2 * len(first) >= 10
    lr, pct = 0.01, 0.2  # conf/model/softmax.yaml, conf/model/scheduler/onecycle.yaml
    assert first == pytest.approx(one_cycle_rates(len(first), lr, pct), rel=1e-9)
    assert second == pytest.approx([0.1 * r for r in one_cycle_rates(len(second), lr, pct)], rel=1e-9)
    assert all(training and before != after for _, _, training, before, after in steps)  # BN as in every CE step


def test_a_phase_schedule_without_a_second_phase_is_refused(make_cfg):
    from src.train import train

    cfg = make_cfg("experiment=softmax_cifar10", "debug=fdr", "data=fake", "data.subset_size=null",
                   "trainer.max_epochs=2", "model.warmup_epochs=2", "model.warmup_fraction=null", "model.schedule_per_phase=true")
    with pytest.raises(ValueError, match="model.warmup_epochs=2 leaves no second phase"):
        train(cfg)


def test_schedule_per_phase_needs_a_total_steps_scheduler(make_cfg):
    from src.train import train

    cfg = make_cfg("experiment=magnet_cifar10", "debug=fdr", "data=fake", "data.subset_size=null", "model.schedule_per_phase=true",
                   "model.lr_scale_after_warmup=1.0", "model.scheduler=null",
                   "model.lr_cap_after_warmup=null")
    with pytest.raises(Exception, match="model.schedule_per_phase restarts a scheduler"):
        train(cfg)


def test_lr_scale_after_warmup_multiplies_the_scheduled_rate_once_magnet_trains(plain_and_fine_tuned_runs):
    """model.lr_scale_after_warmup: every step of the warm-up uses the scheduler's rate, every magnet step
    (from the first of the first magnet epoch) that rate times the factor; compared step by step with the
    same run unscaled."""
    plain, scaled = plain_and_fine_tuned_runs
    assert [s[0] for s in plain] == [s[0] for s in scaled] and {s[0] for s in plain} == {0, 1, 2}
    for (epoch, lr, *_), (_, lr_scaled, *_) in zip(plain, scaled):
        assert lr_scaled == pytest.approx(lr * (0.1 if epoch >= 1 else 1.0), rel=1e-9)
    assert len({s[1] for s in plain}) > 3  # the scheduler really moves the rate


def test_frozen_batchnorm_normalizes_magnet_steps_with_the_running_statistics(plain_and_fine_tuned_runs):
    """model.bn_mode=frozen: the warm-up trains BatchNorm on batch statistics; every magnet step runs it in
    eval mode, so its running statistics (re-estimated on iid batches by the re-clustering pass) do not move
    during the step. bn_mode=batch keeps batch statistics in the magnet steps too, which update them."""
    for run, frozen in zip(plain_and_fine_tuned_runs, (False, True)):
        warmup = [s for s in run if s[0] == 0]
        magnet = [s for s in run if s[0] >= 1]
        assert warmup and magnet
        assert all(training and before != after for _, _, training, before, after in warmup)
        assert all(training != frozen and (before == after) == frozen for _, _, training, before, after in magnet)


def test_lr_scale_after_warmup_must_be_positive():
    from pathlib import Path

    import hydra
    from hydra.errors import InstantiationException

    from tests.conftest import compose

    with pytest.raises(InstantiationException, match="model.lr_scale_after_warmup must be > 0"):
        hydra.utils.instantiate(compose(["model.lr_scale_after_warmup=0"], Path("/tmp/unused")).model)


def test_indexed_loss_restricted_impostors_match_a_loop_over_the_allowed_clusters():
    """impostor_classes (a continual strategy's asymmetric loss): each row's denominator sums over the clusters of its
    allowed classes only; a row left without any gets 0, and the sampler's no-impostor flag is not raised for it."""
    from src.models.components.magnet_loss import magnet_loss_indexed

    g = torch.Generator().manual_seed(3)
    cluster_labels = torch.tensor([0, 1, 2, 3])
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    labels = cluster_labels[ids]
    emb = torch.randn(12, 5, generator=g, dtype=torch.float64)
    allowed = torch.ones(12, 4, dtype=torch.bool)
    allowed[labels == 2] = torch.tensor([False, False, True, True])   # class 2 competes with class 3 only
    allowed[labels == 3] = torch.tensor([False, False, False, True])  # class 3 with nothing: loss 0
    losses, var, lacking = magnet_loss_indexed(emb, ids, labels, cluster_labels, alpha=0.5, impostor_classes=allowed)
    means = torch.stack([emb[ids == c].mean(0) for c in range(4)])
    for i in range(12):
        own = float((emb[i] - means[ids[i]]).pow(2).sum())
        others = [c for c in range(4) if c != int(labels[i]) and allowed[i, c]]
        if not others:
            assert float(losses[i]) == 0.0
            continue
        denom = sum(math.exp(-float((emb[i] - means[c]).pow(2).sum()) / (2 * float(var))) for c in others)
        assert float(losses[i]) == pytest.approx(max(0.0, own / (2 * float(var)) + 0.5 + math.log(denom)), rel=1e-9)
    assert not lacking
