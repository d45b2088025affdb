"""iCaRL (strategy=icarl) and the nearest-class-mean read-out (model.readout=ncm) on fake data."""
import functools
import json
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_continual import interrupt_then_resume, run

ICARL = ["model=softmax", "strategy=icarl", "strategy.buffer_size=20"]
TWO = "data.classes_per_increment=5"  # two increments of five classes: a shorter sequence where five are not needed


def test_class_means_and_nearest_mean_against_a_hand_computed_case():
    from src.utils.metrics import class_means, nearest_mean_predict, nearest_mean_scores

    emb = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 4.0], [4.0, 2.0], [-1.0, 3.0]])
    labels = torch.tensor([0, 0, 2, 2, 3])
    means = class_means(emb, labels, 4)
    # class 0: (0+2)/2, (0+0)/2; class 1: no point; class 2: (4, 3); class 3: the one point
    assert means[[0, 2, 3]].tolist() == [[1.0, 0.0], [4.0, 3.0], [-1.0, 3.0]] and torch.isnan(means[1]).all()
    queries = torch.tensor([[1.0, 1.0], [3.0, 3.0], [-1.0, 2.0], [1.5, 1.5]])
    # squared distances to (1,0), (4,3), (-1,3): (1,1) -> 1, 13, 8; (3,3) -> 13, 1, 16; (-1,2) -> 8, 26, 1;
    # (1.5,1.5) -> 2.5, 8.5, 8.5
    assert nearest_mean_predict(queries, means).tolist() == [0, 2, 3, 0]
    scores = nearest_mean_scores(queries, means)
    assert scores[:, 1].tolist() == [float("-inf")] * 4  # the class without a mean never wins
    assert scores[3, [0, 2, 3]].tolist() == pytest.approx([-2.5, -8.5, -8.5])


def test_ncm_class_il_and_task_il_from_the_memory_means(tmp_path):
    """The runner's NCM read-out: L2-normalised embeddings against the normalised means of the exemplars, over the seen
    classes (Class-IL) or the increment's own (Task-IL)."""
    from src.continual.runner import logit_cil_til_accuracies
    from src.utils.metrics import class_means, nearest_mean_scores

    exemplars = torch.tensor([[1.0, 0.0], [3.0, 0.1], [0.0, 1.0], [0.1, 2.0], [1.0, 1.0], [2.0, 2.1]])
    ex_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    means = F.normalize(class_means(F.normalize(exemplars, dim=1), ex_labels, 4), dim=1)
    # directions: class 0 ~ 0 deg, class 1 ~ 90 deg, class 2 ~ 45 deg (class 3 unseen: no mean)
    emb = F.normalize(torch.tensor([[5.0, 0.5], [0.2, 4.0], [1.0, 0.8], [0.3, 1.0]]), dim=1)
    labels = torch.tensor([0, 1, 2, 2])
    cil, til = logit_cil_til_accuracies(nearest_mean_scores(emb, means), labels, [0, 1, 2], [[0, 1], [2]])
    # the last image of class 2 (73 deg) is nearer class 1 (90) than class 2 (45): wrong in Class-IL only
    assert cil == [1.0, 0.5] and til == [1.0, 1.0]


def test_a_bad_readout_fails_in_one_line(tmp_path):
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="model.readout must be one of head, ncm"):
        run(tmp_path, "bad", "model=softmax", "strategy=replay", "model.readout=ncn")


@pytest.mark.parametrize("strategy", ["naive", "distill"])
def test_ncm_without_kept_images_fails_in_one_line_before_training(tmp_path, strategy):
    with pytest.raises(ValueError, match=rf"model.readout=ncm .*strategy={strategy} keeps none"):
        run(tmp_path, strategy, "model=softmax", f"strategy={strategy}", "model.readout=ncm")


def tiny_module():
    from src.models.components.backbone import EmbeddingNet
    from src.models.softmax_module import SoftmaxModule

    torch.manual_seed(0)
    return SoftmaxModule(net=EmbeddingNet(embedding_dim=8, dropout=0.0), optimizer=functools.partial(torch.optim.SGD, lr=0.5))


def test_icarl_targets_stay_fixed_while_the_student_trains():
    """After the teacher is copied (begin_task of the next increment: the network as the previous increment ended), the
    student's steps move the student's outputs but not the teacher's, so iCaRL's distillation targets on a fixed batch
    stay exactly what they were; the new classes' targets are the one-hot labels."""
    from src.continual.strategies.icarl import ICaRL

    module = tiny_module()
    module.train()
    datamodule = types.SimpleNamespace(classes_of_increment=lambda t: [2 * t, 2 * t + 1], seen_classes=[0, 1, 2, 3],
                                       cumulative=False, memory_indices=None, transform=None,
                                       pool_arrays=lambda idx: (None, None))
    strategy = ICaRL(buffer_size=10)
    strategy.begin_task(1, module, datamodule)  # no memory yet; the teacher is copied here
    assert strategy.teacher is not None and strategy.teacher is not module.net
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 2, 3])
    before = strategy.targets(y, x).clone()
    student_before = module.classifier_logits(module(x)).detach().clone()
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        for _ in range(3):
            xb = torch.randn(6, 3, 32, 32)
            loss = strategy.observe(module, (xb, y, None), module(xb), torch.tensor(0.0))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert not torch.allclose(module.classifier_logits(module(x)).detach(), student_before)  # the student moved
    assert torch.equal(strategy.targets(y, x), before)  # the targets did not
    # old classes 0, 1: the teacher's sigmoid outputs; new classes 2, 3: one-hot; the future classes: one-hot zeros
    with torch.no_grad():
        teacher = torch.sigmoid(strategy.teacher.classifier(strategy.teacher(x)))
    torch.testing.assert_close(before[:, :2], teacher[:, :2])
    assert before[:, 2:].tolist() == F.one_hot(y, 10)[:, 2:].float().tolist()


def test_icarl_loss_is_one_bce_over_the_seen_classes_with_teacher_targets_for_the_old_ones():
    from src.continual.strategies.icarl import ICaRL
    from src.continual.strategies.replay import class_masks

    strategy = ICaRL(buffer_size=10)
    strategy._class_masks, strategy._num_seen = class_masks(10, [2, 3], [0, 1, 2, 3]), 4
    torch.manual_seed(1)
    teacher_logits, logits, y = torch.randn(3, 10), torch.randn(3, 10), torch.tensor([0, 2, 3])

    class Teacher(torch.nn.Module):  # a previous network whose logits are teacher_logits
        classifier = torch.nn.Identity()

        def forward(self, x):
            return teacher_logits

    strategy.teacher = Teacher()
    got = strategy.icarl_loss(logits, y, torch.zeros(3, 3, 32, 32))
    expected = 0.0
    for i in range(3):
        for c in range(4):  # the seen classes; 4..9 are left out
            q = float(torch.sigmoid(teacher_logits[i, c])) if c < 2 else float(y[i] == c)
            p = float(torch.sigmoid(logits[i, c]))
            expected += -(q * np.log(p) + (1 - q) * np.log(1 - p))
    assert float(got) == pytest.approx(expected / 12, rel=1e-5)


def test_icarl_runs_the_sequence_and_reports_the_ncm_read_out(tmp_path):
    results = run(tmp_path, "icarl", "debug=fdr", *ICARL)
    saved = json.loads((tmp_path / "icarl" / "results.json").read_text())
    assert saved["readout"] == "ncm" and saved["strategy_label"] == "iCaRL" and set(saved["readouts"]) == {"ncm", "head"}
    ncm, head = saved["readouts"]["ncm"], saved["readouts"]["head"]
    assert saved["final_class_il_accuracy"] == ncm["final_class_il_accuracy"] == results["final_class_il_accuracy"]
    assert saved["class_il"]["R"] == ncm["class_il"]["R"]
    for r in (ncm, head):
        R = np.array(r["class_il"]["R"], dtype=float)
        assert np.isfinite(R[np.tril_indices(5)]).all() and np.isnan(R[np.triu_indices(5, 1)]).all()
    csv = (tmp_path / "icarl" / "accuracy_matrix.csv").read_text()
    assert "\nclass_il,5," in csv and "\nhead:class_il,5," in csv


def test_replay_with_the_ncm_read_out_carries_both_matrices_and_its_own_label(tmp_path):
    args = ["debug=fdr", TWO, "model=softmax", "strategy=replay", "strategy.buffer_size=20"]
    results = run(tmp_path, "replay_ncm", *args, "model.readout=ncm")
    assert results["readout"] == "ncm" and results["strategy_label"] == "Replay (NCM read-out)"
    assert set(results["readouts"]) == {"ncm", "head"}
    np.testing.assert_array_equal(np.array(results["class_il"]["R"], dtype=float),
                                  np.array(results["readouts"]["ncm"]["class_il"]["R"], dtype=float))
    assert results["final_class_il_accuracy_val"] == results["readouts"]["ncm"]["final_class_il_accuracy_val"]
    plain = run(tmp_path, "replay_head", *args)
    assert plain["readout"] == "head" and set(plain["readouts"]) == {"head"} and plain["strategy_label"] == "Replay"


def test_icarl_resumes_mid_sequence_to_the_same_matrices(tmp_path, monkeypatch):
    from src.continual.strategies.icarl import ICaRL

    args = [*ICARL, TWO, "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
    full, resumed = interrupt_then_resume(tmp_path, monkeypatch, ICaRL, 1, args)  # the teacher and memory of increment 0
    for r in ("ncm", "head"):
        for key in ("class_il", "task_il", "class_il_val"):
            np.testing.assert_allclose(np.array(resumed["readouts"][r][key]["R"], dtype=float),
                                       np.array(full["readouts"][r][key]["R"], dtype=float), rtol=0, atol=1e-6)
    assert resumed["final_class_il_accuracy"] == pytest.approx(full["final_class_il_accuracy"], abs=1e-6)
