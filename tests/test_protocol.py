"""The evaluation protocol: full-size neighbourhood batches, validation measured like the test, randomness
keyed by increment, strategies honoured by every model, and no part silently missing."""
import json
from pathlib import Path

import pytest
import torch

from src.data.neighbourhood_sampler import NeighbourhoodBatchSampler, draw_members, split_quota
from src.models.components.cluster_index import ClusterState, build_cluster_index
from tests.conftest import compose

FAKE = ["data=fake", "data.subset_size=null", "callbacks.rich_progress_bar=null", "model.evaluation.tsne=false"]
CONTINUAL = ["experiment=continual_5x2", "data=fake", "data.subset_size=null", "data.val_size=50",
             "data.train_per_class=30", "data.test_per_class=10", "callbacks.rich_progress_bar=null",
             "model.clusters.K=2", "model.clusters.M=3", "model.clusters.D=4"]


# ---- 1. every neighbourhood batch holds M*D images ------------------------------------------------------
def two_class_increment(k: int, per_class: int = 500):
    """Embeddings of a two-class increment (1,000 images, as in continual_5x2) clustered with K per class."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([3, 7]).repeat_interleave(per_class)
    emb = torch.randn(len(labels), 8, generator=g) + 4 * (labels[:, None] == 7)
    state = ClusterState()
    state.index = build_cluster_index(emb, labels, k=k, seed=0)
    return state, labels


@pytest.mark.parametrize("k, clusters_per_batch", [(1, 2), (2, 3)])
def test_two_class_increment_batches_are_full_size(k, clusters_per_batch):
    """M=6, D=8 (continual_5x2): a two-class increment offers the seed cluster and only K impostors. The
    batch used to shrink to 16 (K=1) or 24 (K=2) images; now the chosen clusters supply all 48."""
    state, labels = two_class_increment(k)
    sampler = NeighbourhoodBatchSampler(state, len(labels), m=6, d=8, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == -(-1000 // 48)
    index = state.index
    for batch in batches:
        assert len(batch) == 48
        clusters = index.assignments[batch]
        # contiguous blocks in cluster order: the seed cluster first, then its impostors
        changes = int((clusters[1:] != clusters[:-1]).sum())
        assert changes == clusters_per_batch - 1
        blocks = torch.unique_consecutive(clusters, return_counts=True)[1].tolist()
        assert blocks == split_quota(48, clusters_per_batch)
        assert set(labels[batch].tolist()) == {3, 7}
        for c in clusters.unique():  # clusters hold >= 250 images: never a repeated image
            picked = batch[clusters == c]
            assert len(picked.unique()) == len(picked)


def test_split_quota_and_draws_match_a_slow_reference():
    for total in (48, 50, 7):
        for parts in range(1, 8):
            quota = split_quota(total, parts)
            assert sum(quota) == total and max(quota) - min(quota) <= 1 and quota == sorted(quota, reverse=True)
    g = torch.Generator().manual_seed(1)
    pool = torch.arange(100, 105)
    drawn = draw_members(pool, 12, g)
    # without replacement while the pool lasts: the first 5 are the whole pool, the rest repeat members
    assert sorted(drawn[:5].tolist()) == pool.tolist() and set(drawn[5:].tolist()) <= set(pool.tolist())
    assert len(draw_members(pool, 3, g).unique()) == 3


def test_random_batches_before_the_index_are_full_size_too():
    sampler = NeighbourhoodBatchSampler(ClusterState(), 100, m=6, d=8)
    assert [len(b) for b in sampler] == [48, 48, 48]


# ---- 2. the checkpoint is chosen on the measurement that is reported --------------------------------------
def test_selected_val_acc_equals_the_test_procedure_on_validation(tmp_path, monkeypatch):
    """Re-evaluating the selected checkpoint with the test-time procedure (fresh embedding pass with the BN
    re-estimation, k-means with the seed of its epoch, final K) on the validation split gives exactly the
    val/acc it was selected on."""
    from src.eval import evaluate
    from src.train import train

    # batch-statistics BN at the full rate: the default's frozen fine-tuning reaches 100 % on fake data, and a
    # perfect score would not tell a real measurement from a constant
    args = ["experiment=magnet_cifar10", *FAKE, "trainer.max_epochs=4", "model.warmup_epochs=1", "model.warmup_fraction=null", "model.clusters.K=2",
            "model.clusters.split_fraction=0.5", "model.clusters.M=4", "model.clusters.D=4", "model.bn_mode=batch",
            "model.lr_scale_after_warmup=1.0"]
    results = train(compose(args, tmp_path / "run"))
    ckpt = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["epoch"] >= 2  # selection starts at the split, floor(0.5 * 4) = 2
    ev = evaluate(compose([f"ckpt_path={results['best_checkpoint']}", "split=val"], tmp_path / "eval",
                          config_name="eval.yaml"))
    assert ev["val/magnet_acc"] == pytest.approx(results["val/best"], abs=1e-4)
    assert 0.1 < results["val/best"] < 1.0  # a real measurement, not a constant
    # the read-out analysis starts from the same procedure: its first row is the selection measurement
    import src.models.readout_choice as readout_choice

    def second_pass(*args, **kwargs):
        raise AssertionError("readout_choices embedded the split again; the test pass's embeddings serve every read-out")

    monkeypatch.setattr(readout_choice, "embed_images", second_pass, raising=False)
    choices = readout_choice.readout_choices(results["best_checkpoint"], split="val")
    assert next(iter(choices.values())) == pytest.approx(results["val/best"], abs=1e-4)


def test_readout_accuracies_match_a_naive_magnet_rule():
    """Each read-out is the magnet rule with that L and variance: against a loop over examples and classes."""
    import math

    from src.models.readout_choice import READOUT_L, VARIANCE_SCALES, readout_accuracies

    g = torch.Generator().manual_seed(3)
    emb, centroids = torch.randn(40, 3, generator=g), torch.randn(9, 3, generator=g)
    centroid_labels, labels = torch.arange(9) % 3, torch.randint(0, 3, (40,), generator=g)

    def naive(var, L):
        right = 0
        for x, y in zip(emb, labels):
            d = [float(((x - c) ** 2).sum()) for c in centroids]
            nearest = sorted(range(len(d)), key=d.__getitem__)[:L]
            score = [sum(math.exp(-d[j] / (2 * var)) for j in nearest if centroid_labels[j] == k) for k in range(3)]
            right += max(range(3), key=score.__getitem__) == int(y)
        return right / len(emb)

    got = readout_accuracies(emb, labels, centroids, centroid_labels, 3, own=("own", 0.7, 9), index_variance=0.2)
    want = [naive(0.7, 9), naive(0.2, 9), *(naive(0.7, L) for L in READOUT_L), *(naive(0.7 * s, 9) for s in VARIANCE_SCALES)]
    assert list(got.values()) == pytest.approx(want)
    assert len(set(want)) > 1  # the read-outs differ on these points, so a mix-up would show


def test_one_embedding_pass_per_epoch(tmp_path, monkeypatch):
    from src.callbacks import recluster
    from src.train import train

    passes = []
    original = recluster.embed_images
    monkeypatch.setattr(recluster, "embed_images", lambda *a, **k: passes.append(1) or original(*a, **k))
    args = ["experiment=magnet_cifar10", *FAKE, "trainer.max_epochs=4", "model.warmup_epochs=1", "model.warmup_fraction=null", "model.clusters.K=2",
            "model.clusters.split_fraction=null", "model.clusters.M=4", "model.clusters.D=4", "test=false"]
    train(compose(args, tmp_path / "run"))
    assert len(passes) == 4  # the end of the warm-up epoch and of each of the 3 magnet epochs


def small_bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.BatchNorm1d(4))


def test_augmented_bn_pass_sees_the_seeded_augmented_images():
    """embed_images(recalibrate_bn=True, augment_seed=s) gives exactly what the clean pass gives on the images
    augmented beforehand, batch by batch, with a generator seeded with s: the same embeddings and the same
    re-estimated BatchNorm statistics. The same seed repeats the pass; another seed, or clean images, differ."""
    from src.data.transforms import BatchTransform
    from src.models.embed import batchnorm_layers, embed_images

    transform = BatchTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_padding=4)
    images = torch.randint(0, 256, (23, 3, 12, 12), dtype=torch.uint8)
    net = small_bn_net()

    def bn_pass(imgs, **kw):
        emb = embed_images(net, transform, imgs, batch_size=10, recalibrate_bn=True, **kw)
        return emb, [b.running_mean.clone() for b in batchnorm_layers(net)] + [b.running_var.clone() for b in batchnorm_layers(net)]

    g = torch.Generator().manual_seed(7)
    # the reference: augmentation drawn batch by batch (10, 10, 3) outside the pass, with uint8 in, uint8 out
    pre = torch.cat([transform.random_flip(transform.random_crop(images[i:i + 10], 4, g), g) for i in range(0, 23, 10)])
    emb_ref, stats_ref = bn_pass(pre)
    emb, stats = bn_pass(images, augment_seed=7)
    torch.testing.assert_close(emb, emb_ref, rtol=0, atol=0)
    for a, b in zip(stats, stats_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    emb_again, _ = bn_pass(images, augment_seed=7)
    assert torch.equal(emb, emb_again)
    assert not torch.allclose(bn_pass(images, augment_seed=8)[0], emb)
    assert not torch.allclose(bn_pass(images)[1][0], stats[0])  # clean images: other statistics
    with pytest.raises(ValueError, match="needs recalibrate_bn"):
        embed_images(net, transform, images, augment_seed=7)


@pytest.mark.parametrize("augment", [True, False])
def test_reclustering_pass_is_augmented_with_the_index_seed(tmp_path, monkeypatch, augment):
    """With callbacks.recluster.bn_pass_augment=true every re-clustering pass of a magnet run is augmented,
    keyed by the k-means seed of its epoch (so each epoch draws anew and the test-time rebuild, which reuses
    the selected epoch's seed, repeats its pass); with false (the default), every pass sees clean images."""
    from src.callbacks import recluster
    from src.train import train

    seeds = []
    original = recluster.embed_images
    monkeypatch.setattr(recluster, "embed_images",
                        lambda *a, **k: seeds.append(k.get("augment_seed")) or original(*a, **k))
    args = ["experiment=magnet_cifar10", *FAKE, "trainer.max_epochs=3", "model.warmup_epochs=1", "model.warmup_fraction=null", "model.clusters.K=2",
            "model.clusters.split_fraction=null", "model.clusters.M=4", "model.clusters.D=4",
            f"callbacks.recluster.bn_pass_augment={str(augment).lower()}"]
    results = train(compose(args, tmp_path / "run"))
    assert len(seeds) == 4  # the ends of epochs 0, 1, 2 and the test-time rebuild
    if not augment:
        assert seeds == [None] * 4
        return
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds[:3])) == 3
    selected = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)["epoch"]
    assert seeds[3] == seeds[selected]  # the test repeats the pass the selected epoch was validated with


@pytest.mark.parametrize("experiment, overrides, names", [
    ("magnet_cifar10", ["callbacks.recluster.recalibrate_bn=false"], "recalibrate_bn=false"),
    ("softmax_cifar10", [], "SoftmaxModule"),
    ("magnet_cifar10", ["data.augment=false"], "data.augment is false"),
])
def test_bn_pass_augment_that_cannot_act_is_a_one_line_error(tmp_path, experiment, overrides, names):
    """bn_pass_augment=true where there is no re-estimation pass (recalibrate_bn off, or a model that keeps
    its running statistics) or nothing to augment fails before training instead of doing nothing."""
    from src.train import train

    args = [f"experiment={experiment}", *FAKE, "trainer.max_epochs=2", "callbacks.recluster.bn_pass_augment=true",
            *overrides]
    with pytest.raises(Exception) as err:
        train(compose(args, tmp_path / "run"))
    root = err.value  # Hydra wraps errors raised while instantiating the callback
    while root.__cause__ is not None:
        root = root.__cause__
    message = str(root)
    assert isinstance(root, ValueError) and "bn_pass_augment" in message and names in message
    assert "\n" not in message


# ---- 5. randomness keyed by (seed, increment, epoch) ------------------------------------------------------
def test_increments_draw_different_batches_and_seeds():
    from types import SimpleNamespace

    from src.callbacks.epoch_seed import EpochSeed
    from src.callbacks.recluster import ReclusterCallback
    from src.data.fake_datamodule import FakeDataModule

    dm = FakeDataModule(train_per_class=30, test_per_class=5, val_size=50, subset_size=None, seed=3)
    orders = {}
    for t in (0, 1, 0):
        dm.increment = t
        orders.setdefault(t, []).append(torch.cat(list(dm.train_dataloader().batch_sampler)))
    assert len(orders[0][0]) == len(orders[1][0]) == 50  # the same positions 0..49 in both increments
    assert torch.equal(orders[0][0], orders[0][1]) and not torch.equal(orders[0][0], orders[1][0])

    state, labels = two_class_increment(2, per_class=50)
    a, b = (list(NeighbourhoodBatchSampler(state, len(labels), 3, 4, seed=3, increment=t)) for t in (0, 1))
    assert any(not torch.equal(x, y) for x, y in zip(a, b))

    def trainer_at(t, epoch=0):
        return SimpleNamespace(datamodule=SimpleNamespace(increment=t), current_epoch=epoch, global_rank=0)

    seeds = {(t, e): ReclusterCallback(seed=3).kmeans_seed(trainer_at(t), e) for t in (0, 1) for e in (0, 1)}
    assert len(set(seeds.values())) == 4
    draws = []
    for t in (0, 1, 0):
        EpochSeed(3).on_train_epoch_start(trainer_at(t), None)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


def test_replay_random_selection_depends_on_the_increment_and_the_class():
    from src.continual.strategies.replay import Replay

    pool = torch.arange(1000, 1400)
    strat = Replay(buffer_size=20, selection="random", seed=5)
    first, again, later = (strat.select_exemplars(pool, 10, t, 3, None, None) for t in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, later)
    assert set(first.tolist()) <= set(pool.tolist()) and len(first.unique()) == 10
    # the two classes of one increment: same pool positions would mean the same permutation for both
    other_class = strat.select_exemplars(pool, 10, 0, 4, None, None)
    assert not torch.equal(first, other_class)


# ---- 6. no silent no-ops and no hidden coupling -------------------------------------------------------------
@pytest.mark.parametrize("model", ["softmax", "triplet"])
def test_every_model_honours_its_strategy(tmp_path, monkeypatch, model):
    from src.continual.strategies.distill import Distill
    from src.train import train

    calls = []
    original = Distill.observe

    def counting(self, module, batch, embeddings, loss):
        out = original(self, module, batch, embeddings, loss)
        calls.append(self.teacher is not None and not torch.equal(out, loss))
        return out

    monkeypatch.setattr(Distill, "observe", counting)
    train(compose([*CONTINUAL, f"model={model}", "strategy=distill", "debug=fdr"], tmp_path / model))
    assert calls and any(calls)  # called in every increment, and changed the loss once a teacher existed


def test_missing_recluster_callback_is_one_clear_line(tmp_path):
    from src.train import train

    with pytest.raises(ValueError, match=r"needs the re-clustering callback.*callbacks.recluster") as e:
        train(compose(["experiment=magnet_cifar10", *FAKE, "debug=fdr", "~callbacks.recluster"], tmp_path / "a"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"needs the re-clustering callback.*callbacks.recluster"):
        train(compose([*CONTINUAL, "strategy=naive", "debug=fdr", "~callbacks.recluster"], tmp_path / "b"))


def test_datamodule_batches_without_any_callback():
    """The datamodule gets its sampler from the model it trains (none here: iid batches), not from a
    factory a callback installed."""
    from src.data.fake_datamodule import FakeDataModule

    dm = FakeDataModule(train_per_class=30, test_per_class=5, val_size=50, subset_size=None, batch_size=16)
    batches = [b[0] for b in dm.train_dataloader()]
    assert [len(b) for b in batches] == [16] * 15 + [10]  # 250 training images (50 held out for validation)


def test_sampler_errors_name_existing_keys(make_cfg):
    from src.train import train

    with pytest.raises(Exception, match=r"model\.clusters\.D must be >= 1") as e:
        train(make_cfg("experiment=magnet_cifar10", "debug=fdr", *FAKE, "model.clusters.D=0"))
    root = e.value
    while root.__cause__ is not None:
        root = root.__cause__
    assert "model.sampler" not in str(root)
    cfg = make_cfg("experiment=magnet_cifar10")
    assert "D" in cfg.model.clusters and "sampler" not in cfg.model


def test_eval_reevaluates_a_continual_state(tmp_path):
    from src.eval import evaluate
    from src.train import train

    run = train(compose([*CONTINUAL, "strategy=magnet_memory", "strategy.buffer_size=20", "debug=fdr"], tmp_path / "cl"))
    ev = evaluate(compose([f"ckpt_path={tmp_path / 'cl' / 'continual_state.pt'}"], tmp_path / "ev", config_name="eval.yaml"))
    assert ev["completed_increments"] == 5
    for key in ("class_il", "task_il", "class_il_val", "task_il_val"):
        assert ev[key]["R"][4] == pytest.approx(run[key]["R"][4], abs=1e-6), key
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert saved["class_il"]["average_accuracy"] == pytest.approx(run["class_il"]["average_accuracy"], abs=1e-6)

    from src.continual.centroid_choice import main as centroid_choice

    choices = centroid_choice([str(tmp_path / "cl" / "continual_state.pt")])
    assert len(choices) == 4 and all(0 <= v <= 1 for v in choices.values())
    assert choices["strategy's own"] == pytest.approx(run["final_class_il_accuracy_val"], abs=1e-6)


@pytest.mark.parametrize("content, what", [
    ({"state_dict": {}, "epoch": 3}, "a Lightning checkpoint without this project's run config"),
    ({"w": torch.zeros(2)}, "a plain state dict of 1 tensors"),
    ({"completed": 1, "R_cil": None}, "a continual_state.pt written before run configs"),
])
def test_eval_error_for_a_file_without_config_says_what_it_is(tmp_path, content, what):
    from src.eval import evaluate

    path = tmp_path / "thing.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=f"carries no run config: it is {what}") as e:
        evaluate(compose([f"ckpt_path={path}"], tmp_path / "ev", config_name="eval.yaml"))
    assert "\n" not in str(e.value)
    path.write_text("not a torch file")
    with pytest.raises(ValueError, match="is not a torch file"):
        evaluate(compose([f"ckpt_path={path}"], tmp_path / "ev", config_name="eval.yaml"))


def test_continual_results_carry_validation_matrices(tmp_path):
    import numpy as np

    from src.train import train

    res = train(compose([*CONTINUAL, "strategy=naive", "debug=fdr"], tmp_path / "cl"))
    saved = json.loads((Path(tmp_path) / "cl" / "results.json").read_text())
    for key in ("class_il_val", "task_il_val"):
        R = np.array(saved[key]["R"], dtype=float)
        assert R.shape == (5, 5) and np.isfinite(R[np.tril_indices(5)]).all()
    assert 0 <= res["final_class_il_accuracy_val"] <= 1
    assert "class_il_val" in (tmp_path / "cl" / "accuracy_matrix.csv").read_text()


def test_recluster_schedule_and_stale_indices_are_not_selectable():
    """every_n_epochs=2 re-clusters at the end of the last warm-up epoch, every second epoch after it and
    after the last epoch; an epoch validated on an older index can never be selected."""
    from types import SimpleNamespace

    from src.callbacks.recluster import ReclusterCallback

    module = SimpleNamespace(warmup_epochs=2, trainer=SimpleNamespace(max_epochs=8))
    due = [e for e in range(8) if ReclusterCallback(every_n_epochs=2).due_after(e, module)]
    assert due == [1, 3, 5, 7]
    module.trainer.max_epochs = 7
    assert [e for e in range(7) if ReclusterCallback(every_n_epochs=2).due_after(e, module)] == [1, 3, 5, 6]
    assert [e for e in range(4) if ReclusterCallback().due_after(e, module)] == [1, 2, 3]

    import hydra

    from src.models.magnet_module import MagnetModule

    model = hydra.utils.instantiate(compose(["model.clusters.split_fraction=null", "model.warmup_epochs=1", "model.warmup_fraction=null"],
                                            Path("/tmp/unused")).model)
    assert isinstance(model, MagnetModule)
    for epoch, fresh, expected in [(0, True, False), (1, False, False), (1, True, True)]:
        model.index_fresh = fresh
        assert model_selectable_at(model, epoch) is expected


def model_selectable_at(model, epoch: int) -> bool:
    from unittest import mock

    with mock.patch.object(type(model), "current_epoch", new_callable=mock.PropertyMock, return_value=epoch):
        return model.selectable()
