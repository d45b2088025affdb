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


@pytest.mark.parametrize("experiment, module_path, extra", [
    ("magnet_cifar10", "src.models.magnet_module.MagnetModule",
     ["model.warmup_epochs=0", "model.clusters.split_fraction=null", "model.clusters.M=4", "model.clusters.D=3"]),
    ("softmax_cifar10", "src.models.softmax_module.SoftmaxModule", ["data.batch_size=16"]),
])
def test_training_steps_make_no_host_sync(tmp_path, monkeypatch, experiment, module_path, extra):
    import importlib

    from src.train import train

    module_name, cls_name = module_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    calls = []
    monkeypatch.setattr(cls, "training_step", guarded(cls.training_step, calls))
    train(compose([f"experiment={experiment}", *TINY, *extra], tmp_path / experiment))
    assert calls.count(0) == 3 and calls.count(1) == 3  # every step of both epochs ran under the guard


def test_the_guard_catches_the_previous_magnet_step():
    # what the step did before: cluster ids via pos.cpu(), torch.unique and label checks in the loss
    from src.models.components.magnet_loss import magnet_loss_with_options

    emb, ids, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 1, 0, 0])
    with pytest.raises(RuntimeError), forbid_host_syncs():
        magnet_loss_with_options(emb, ids, labels)
