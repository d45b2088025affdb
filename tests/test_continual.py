"""Continual learning: strategies on fake data, exemplar memory, Class-IL/Task-IL masks, resume."""
import json

import numpy as np
import pytest
import torch

from src.continual.runner import cil_til_accuracies
from src.continual.strategies.magnet_memory import shift_centroids
from src.continual.strategies.replay import herding
from tests.conftest import compose

STRATEGIES = ["naive", "joint", "replay", "distill", "magnet_memory"]
TINY = ["experiment=continual_5x2", "data=fake", "data.subset_size=null", "data.val_size=50", "data.train_per_class=30",
        "data.test_per_class=10", "callbacks.rich_progress_bar=null", "model.clusters.K=2", "model.clusters.M=3",
        "model.clusters.D=4"]
WITH_MEMORY = {"replay", "distill", "magnet_memory"}


def run(tmp_path, name, *extra):
    from src.train import train

    return train(compose([*TINY, *extra], tmp_path / name))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_the_sequence_with_fast_dev_run(tmp_path, strategy):
    extra = ["debug=fdr", f"strategy={strategy}"]
    if strategy in WITH_MEMORY:
        extra.append("strategy.buffer_size=20")
    results = run(tmp_path, strategy, *extra)
    out = tmp_path / strategy
    saved = json.loads((out / "results.json").read_text())
    R = np.array(saved["class_il"]["R"], dtype=float)
    assert R.shape == (5, 5) and np.isnan(R[np.triu_indices(5, 1)]).all()
    assert np.isfinite(R[np.tril_indices(5)]).all()
    assert len(saved["table"]) == 5 and saved["table"][0]["class_ids"] == [0, 1]
    for f in ("accuracy_matrix.csv", "accuracy_curve.png", "accuracy_matrix.png"):
        assert (out / f).is_file()
    assert results["final_class_il_accuracy"] == saved["table"][-1]["accuracy_seen"]


def test_masks_class_il_vs_task_il():
    # class 2's test image sits next to class 0's centroid: wrong among all seen classes (Class-IL),
    # right when only its own increment's classes {2, 3} compete (Task-IL).
    centroids = torch.tensor([[0.0], [10.0], [1.0], [20.0]])
    centroid_labels = torch.tensor([0, 1, 2, 3])
    emb = torch.tensor([[0.2], [9.8], [0.4], [19.0]])
    labels = torch.tensor([0, 1, 2, 3])
    cil, til = cil_til_accuracies(emb, labels, centroids, centroid_labels, 0.5, [[0, 1], [2, 3]], 4, L=10)
    assert cil == [1.0, 0.5] and til == [1.0, 1.0]


def test_herding_picks_points_whose_mean_tracks_the_class_mean():
    emb = torch.tensor([[0.0, 0.0], [10.0, 0.0], [-10.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    order = herding(emb, 3)
    # class mean (0.2, 1.0): first pick is the point nearest it, and picks are distinct
    assert order[0].item() == 0 and len(set(order.tolist())) == 3
    slow = []
    running = torch.zeros(2)
    mu = emb.mean(0)
    for k in range(1, 4):
        best = min((i for i in range(5) if i not in slow), key=lambda i: float(((running + emb[i]) / k - mu).pow(2).sum()))
        slow.append(best)
        running += emb[best]
    assert order.tolist() == slow


def test_drift_compensation_moves_centroids_with_their_exemplars():
    cents = torch.tensor([[0.0, 0.0], [10.0, 0.0], [50.0, 50.0]])
    before = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [10.0, 1.0]])
    after = before + torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, -2.0]])
    shifted = shift_centroids(cents, before, after)
    assert shifted[0].tolist() == [2.0, 0.0]      # mean drift of its two exemplars
    assert shifted[1].tolist() == [10.0, -2.0]
    assert torch.allclose(shifted[2], torch.tensor([50.0 + 4 / 3, 50.0 - 2 / 3]))  # no exemplar: class drift


def test_memory_respects_size_and_stays_class_balanced(tmp_path):
    from src.continual.strategies.replay import Replay
    from src.data.fake_datamodule import FakeDataModule
    from src.models.components.backbone import EmbeddingNet

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = EmbeddingNet(embedding_dim=8)

        def forward(self, x):
            return self.net(x)

        device = torch.device("cpu")

    dm = FakeDataModule(train_per_class=30, test_per_class=5, val_size=50, subset_size=None)
    dm.setup()
    for selection in ("herding", "random"):
        strat = Replay(buffer_size=21, selection=selection)
        for t in range(5):
            dm.increment = t
            strat.begin_task(t, Stub(), dm)
            _update_memory_only(strat, t, Stub(), dm)
            sizes = {c: len(v) for c, v in strat.memory.items()}
            per = 21 // (2 * (t + 1))
            assert set(sizes) == set(dm.seen_classes) and set(sizes.values()) == {per}
            assert sum(sizes.values()) <= 21
            labels = dm.load_raw()["train_y"]
            for c, idx in strat.memory.items():
                assert torch.all(labels[idx] == c) and set(idx.tolist()) <= set(dm.train_pool.tolist())
            assert torch.equal(dm.memory_indices.sort().values, strat.memory_indices().sort().values)


def _update_memory_only(strategy, t, module, dm):
    """Replay.end_task without the base class's centroid bookkeeping (which needs a trained index)."""
    from src.continual.strategies.base import Strategy

    original = Strategy.end_task
    Strategy.end_task = lambda *a, **k: None
    try:
        strategy.end_task(t, module, dm)
    finally:
        Strategy.end_task = original


def test_resume_after_interruption_gives_the_same_matrix(tmp_path, monkeypatch):
    from src.continual.strategies.naive import Naive

    args = ["strategy=naive", "trainer.max_epochs=1", "model.warmup_epochs=0", "trainer.limit_train_batches=2"]
    full = run(tmp_path, "full", *args)

    original = Naive.begin_task

    def crash_at_third(self, t, module, dm):
        if t == 3:
            raise KeyboardInterrupt("simulated kill during increment 3")
        return original(self, t, module, dm)

    monkeypatch.setattr(Naive, "begin_task", crash_at_third)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "resumed", *args)
    assert (tmp_path / "resumed" / "continual_state.pt").is_file()
    assert not (tmp_path / "resumed" / "results.json").exists()
    monkeypatch.setattr(Naive, "begin_task", original)
    resumed = run(tmp_path, "resumed", *args)
    np.testing.assert_allclose(np.array(resumed["class_il"]["R"], dtype=float),
                               np.array(full["class_il"]["R"], dtype=float), rtol=0, atol=1e-6)


def test_compare_draws_one_figure_and_one_table(tmp_path):
    from src.compare import main

    runs = []
    for i, (name, last) in enumerate([("Naive", 0.2), ("MagnetMemory", 0.6), ("MagnetMemory", 0.5)]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        R = [[0.9, None], [last, 0.8]]
        summary = {"R": R, "average_accuracy": (last + 0.8) / 2, "average_incremental_accuracy": 0.8,
                   "forgetting": 0.9 - last, "backward_transfer": last - 0.9}
        (d / "results.json").write_text(json.dumps({
            "strategy": f"src.continual.strategies.x.{name}", "class_il": summary, "task_il": summary,
            "table": [{"accuracy_seen": 0.9}, {"accuracy_seen": (last + 0.8) / 2}], "time/total_s": 10.0}))
        runs.append(str(d))
    md = main([*runs, "--out", str(tmp_path / "cmp")])
    assert "| Naive | 1 | 50.0 |" in md
    assert "| MagnetMemory | 2 | 67.5 ± 3.5 | – |" in md  # these runs carry no validation matrix
    assert (tmp_path / "cmp.png").stat().st_size > 1000 and (tmp_path / "cmp.md").read_text() == md
