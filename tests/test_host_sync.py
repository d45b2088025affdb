"""The training step never waits for the host: run real training steps under a guard that fails on any
operator reading device values back (CPU stand-in for CUDA's sync debug mode; see src/utils/host_sync.py)."""
import pytest
import torch

from src.utils.host_sync import forbid_host_syncs
from tests.conftest import compose

TINY = ["data=fake", "data.subset_size=null", "data.val_size=40", "data.train_per_class=30", "data.test_per_class=4",
        "callbacks.rich_progress_bar=null", "model.evaluation.tsne=false", "trainer.max_epochs=2",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


def guarded(step, calls):
    def run(self, *args, **kwargs):
        with forbid_host_syncs():
            out = step(self, *args, **kwargs)
        calls.append(self.current_epoch)
        return out
    return run


MAGNET = ["model.warmup_epochs=0", "model.warmup_fraction=null", "model.clusters.split_fraction=null", "model.clusters.M=4", "model.clusters.D=3"]
# two increments of five classes: the strategies' steps at a third of five increments' cost
CONTINUAL = ["data.classes_per_increment=5", "model.warmup_epochs=0", "model.warmup_fraction=null", "model.clusters.split_fraction=null", "model.clusters.K=2", "model.clusters.M=3", "model.clusters.D=4", "strategy.buffer_size=20",
             "trainer.limit_train_batches=2"]


@pytest.mark.parametrize("experiment, module_path, extra, fits", [
    ("magnet_cifar10", "src.models.magnet_module.MagnetModule", MAGNET, 1),
    ("softmax_cifar10", "src.models.softmax_module.SoftmaxModule", ["data.batch_size=16"], 1),
    ("triplet_cifar10", "src.models.triplet_module.TripletModule", ["data.batch_size=16"], 1),
    # the continual runner's steps: the strategies' observe() runs inside training_step
    ("continual_5x2", "src.models.magnet_module.MagnetModule", ["strategy=magnet_memory", *CONTINUAL], 2),
    ("continual_5x2", "src.models.softmax_module.SoftmaxModule", ["model=softmax", "strategy=der", "data.batch_size=16", *CONTINUAL], 2),
    ("continual_5x2", "src.models.softmax_module.SoftmaxModule",
     ["model=softmax", "strategy=replay", "strategy.replay_mode=batch", "data.batch_size=16", *CONTINUAL], 2),
    # iCaRL's BCE with the teacher's targets, over the step's batch and an appended exemplar batch
    ("continual_5x2", "src.models.softmax_module.SoftmaxModule",
     ["model=softmax", "strategy=icarl", "strategy.replay_mode=batch", "data.batch_size=16", *CONTINUAL], 2),
], ids=["magnet", "softmax", "triplet", "continual-magnet_memory", "continual-softmax-der", "continual-softmax-replay-batch",
        "continual-softmax-icarl-batch"])
def test_training_steps_make_no_host_sync(tmp_path, monkeypatch, experiment, module_path, extra, fits):
    import importlib

    from src.train import train

    module_name, cls_name = module_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    calls = []
    monkeypatch.setattr(cls, "training_step", guarded(cls.training_step, calls))
    train(compose([f"experiment={experiment}", *TINY, *extra], tmp_path / experiment))
    # every step of both epochs (of every increment) ran under the guard
    steps = 2 if experiment.startswith("continual") else 3
    assert calls.count(0) == steps * fits and calls.count(1) == steps * fits


def test_the_guard_catches_the_previous_magnet_step():
    # what the step did before: cluster ids via pos.cpu(), torch.unique and label checks in the loss
    from src.models.components.magnet_loss import magnet_loss_with_options

    emb, ids, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 1, 0, 0])
    with pytest.raises(RuntimeError), forbid_host_syncs():
        magnet_loss_with_options(emb, ids, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.set_sync_debug_mode exists only "
                    "there (the CPU guard above checks the same steps' operators)")
def test_magnet_steps_pass_cuda_sync_debug_mode_error(tmp_path, monkeypatch):
    from src.models.magnet_module import MagnetModule
    from src.train import train

    calls = []

    def run(step):
        def guarded_step(self, *args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call in the step raises
            try:
                out = step(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            calls.append(self.current_epoch)
            return out
        return guarded_step

    monkeypatch.setattr(MagnetModule, "training_step", run(MagnetModule.training_step))
    train(compose(["experiment=magnet_cifar10", *TINY, *MAGNET, "trainer.accelerator=gpu"], tmp_path / "gpu"))
    assert calls.count(0) == 3 and calls.count(1) == 3
