"""Composition of every experiment and end-to-end fast_dev_run / short runs through src.train."""
import json
from pathlib import Path

import pytest
import torch

from src.utils.instantiate import PROJECT_ROOT
from tests.conftest import REAL_DATA_DIR, needs_real_data

EXPERIMENTS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "experiment").glob("*.yaml"))
FAST = ["data=fake", "data.subset_size=null", "logger=csv", "callbacks.rich_progress_bar=null", "model.evaluation.tsne_per_class=5"]


@pytest.fixture(scope="module", autouse=True)
def offline_torchvision_weights(tmp_path_factory):
    """experiment=magnet_cifar10_pretrained asks for torchvision's ImageNet weights: serve a randomly initialised
    file of the same layout from a private torch cache, so these tests never reach for the network."""
    from tests.conftest import serve_torchvision_googlenet_offline

    with pytest.MonkeyPatch.context() as mp:
        serve_torchvision_googlenet_offline(tmp_path_factory.mktemp("torch_home"), mp)
        yield


def test_experiments_exist():
    assert {"magnet_cifar10", "softmax_cifar10", "triplet_cifar10", "magnet_cifar10_pretrained"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(make_cfg, experiment):
    import hydra

    cfg = make_cfg(f"experiment={experiment}", "data=fake")
    assert cfg.trainer.max_epochs >= 1
    model = hydra.utils.instantiate(cfg.model)
    dm = hydra.utils.instantiate(cfg.data)
    assert model.num_classes == dm.num_classes == 10


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_every_experiment(make_cfg, experiment):
    from src.train import train

    # the pretrained experiment upsamples to 128 px; 64 px runs the same path at a quarter of the CPU time
    smaller = ["data.input_size=64"] if experiment == "magnet_cifar10_pretrained" else []
    cfg = make_cfg(f"experiment={experiment}", "debug=fdr", *FAST, *smaller)
    results = train(cfg)
    out = Path(cfg.paths.output_dir)
    saved = json.loads((out / "results.json").read_text())
    assert (out / "config_resolved.yaml").is_file()
    if "test/magnet_acc" in saved:  # continual runs report their own keys
        assert 0 <= saved["test/magnet_acc"] <= 1 and 0 <= saved["test/knn_acc"] <= 1
        assert "test/attr_conc@10" in saved and (out / "tsne.png").is_file()
    assert saved["seed"] == results["seed"]


def test_compile_flag_compiles_the_network_once_and_trains_through_it(make_cfg, monkeypatch):
    """model.compile=true: one in-place torch.compile of the network (CPU: default mode, static shapes), used by
    every forward of the run. The real inductor compile of GoogLeNet takes minutes on this CPU, so the test swaps
    in torch's "eager" backend, which runs the same dynamo capture without generating code."""
    from src.train import train

    calls, real_compile = [], torch.compile

    def recording_compile(fn, **kwargs):
        calls.append(kwargs)
        compiled = real_compile(fn, **{**kwargs, "mode": None, "backend": "eager"})
        return lambda *a, **k: (calls.append("forward"), compiled(*a, **k))[1]

    monkeypatch.setattr(torch, "compile", recording_compile)
    cfg = make_cfg("experiment=magnet_cifar10", "debug=fdr", *FAST, "model.compile=true")
    train(cfg)
    assert calls[0] == {"mode": None, "dynamic": False}
    assert sum(c == {"mode": None, "dynamic": False} for c in calls) == 1  # fit and test: compiled once
    assert calls.count("forward") >= 3  # training step, re-clustering pass and evaluation all went through it


def test_default_command_with_fdr(make_cfg):
    from src.train import train

    cfg = make_cfg("debug=fdr", *FAST)
    train(cfg)
    assert (Path(cfg.paths.output_dir) / "results.json").is_file()


SHORT = ["experiment=magnet_cifar10", *FAST, "trainer.max_epochs=3", "model.warmup_epochs=1", "model.warmup_fraction=null", "model.clusters.K=2",
         "model.clusters.split_fraction=null", "model.clusters.M=4", "model.clusters.D=4", "model.evaluation.tsne=false"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One short magnet run on fake data, shared by the tests that inspect its outputs."""
    from src.train import train
    from tests.conftest import compose

    return train(compose(SHORT, tmp_path_factory.mktemp("short") / "run"))


def test_magnet_run_learns_on_fake_data_and_selects_on_validation(short_run):
    results = short_run
    assert results["test/magnet_acc"] > 0.3  # chance is 0.1
    assert results["best_checkpoint"] and "checkpoints" in results["best_checkpoint"]
    ckpt = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)
    assert "cluster_state" in ckpt and "config" in ckpt and "running_variance" in str(ckpt["state_dict"].keys())


def test_same_seed_same_metrics(make_cfg, tmp_path):
    from src.train import train
    from tests.conftest import compose

    args = ["experiment=magnet_cifar10", *FAST, "trainer.max_epochs=2", "model.warmup_epochs=1", "model.warmup_fraction=null", "model.clusters.K=2",
            "model.clusters.split_fraction=null",
            "model.clusters.M=4", "model.clusters.D=4", "model.evaluation.tsne=false", "seed=7"]
    a = train(compose(args, tmp_path / "a"))
    b = train(compose(args, tmp_path / "b"))
    keys = [k for k in a if k.startswith("test/")]
    assert keys and all(a[k] == b[k] for k in keys), {k: (a[k], b[k]) for k in keys}


@pytest.mark.parametrize("override, match", [
    ("model.clusters.M=1", "M must be >= 2"),
    ("model.clusters.K=0", "K and L must be >= 1"),
    ("model.loss.alpha=-1", "alpha must be >= 0"),
    ("model.bn_mode=weird", "bn_mode"),
    ("data.classes_per_increment=3", "classes_per_increment must divide"),
    ("model.compile=maybe", "model.compile must be true or false"),
])
def test_invalid_hyperparameters_fail_with_one_clear_line(make_cfg, override, match):
    from src.train import train

    cfg = make_cfg("experiment=magnet_cifar10", "debug=fdr", *FAST, override)
    with pytest.raises(Exception, match=match) as e:
        train(cfg)
    root = e.value
    while root.__cause__ is not None:
        root = root.__cause__
    assert "\n" not in str(root)


def test_nan_loss_stops_with_a_clear_error(make_cfg, monkeypatch):
    from src.models.components import magnet_loss as ml
    from src.train import train

    original = ml.MagnetLoss.indexed

    def poisoned(self, *a, **kw):
        mean, losses, var, lacking = original(self, *a, **kw)
        return mean * float("nan"), losses, var, lacking

    monkeypatch.setattr(ml.MagnetLoss, "indexed", poisoned)
    cfg = make_cfg("experiment=magnet_cifar10", "debug=fdr", *FAST)
    with pytest.raises(FloatingPointError, match="magnet loss became nan or inf between epoch 0 step 0 and epoch 0 step "
                       ".*lower model.optimizer.lr"):
        train(cfg)


def test_missing_data_folder_fails_clearly(make_cfg, tmp_path):
    from src.data.cifar10 import DataError
    from src.train import train

    cfg = make_cfg("experiment=magnet_cifar10", "debug=fdr", f"data.data_dir={tmp_path / 'nothing'}")
    with pytest.raises(DataError, match="does not exist.*build_cifar10.py"):
        train(cfg)


@needs_real_data
def test_real_data_smoke(make_cfg):
    """Tiny budget on the built JPEG copy of CIFAR-10: trains, tests, writes results.json."""
    from src.train import train

    cfg = make_cfg(f"data.data_dir={REAL_DATA_DIR}", "trainer.max_epochs=1", "model.warmup_epochs=0", "model.warmup_fraction=null", "data.subset_size=1000",
                   "data.val_size=200", "trainer.limit_train_batches=5", "model.evaluation.tsne=false",
                   "callbacks.rich_progress_bar=null")
    results = train(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert saved["test/magnet_acc"] == results["test/magnet_acc"]
    assert 0 <= saved["test/magnet_acc"] <= 1


def test_eval_reproduces_test_metrics_from_a_checkpoint(short_run, tmp_path):
    from src.eval import evaluate
    from tests.conftest import compose

    results = short_run
    ev_cfg = compose([f"ckpt_path={results['best_checkpoint']}", "trainer.accelerator=cpu"], tmp_path / "eval",
                     config_name="eval.yaml")
    ev = evaluate(ev_cfg)
    assert (tmp_path / "eval" / "results.json").is_file()
    for key in ("test/magnet_acc", "test/knn_acc", "test/nmi", "test/map_at_r"):
        assert ev[key] == pytest.approx(results[key], abs=1e-6), key


def test_k_schedule_and_checkpoint_selection_window(make_cfg):
    import hydra

    cfg = make_cfg("experiment=magnet_cifar10", "model.clusters.K=4", "model.clusters.K_initial=1",
                   "model.clusters.split_fraction=0.7", "model.warmup_epochs=3", "model.warmup_fraction=null")
    model = hydra.utils.instantiate(cfg.model)
    assert [model.clusters_per_class(e, max_epochs=10) for e in (0, 6, 7, 9)] == [1, 1, 4, 4]
    assert [model.clusters_per_class(e, max_epochs=50) for e in (34, 35)] == [1, 4]
    assert model.clusters_per_class(None) == 4  # testing and src.eval use the final K
    assert model.selection_start_epoch(max_epochs=10) == 7 and model.selection_start_epoch(max_epochs=3) == 3
    no_schedule = hydra.utils.instantiate(make_cfg("model.clusters.K=3", "model.clusters.split_fraction=null").model)
    assert no_schedule.clusters_per_class(0) == 3 and no_schedule.selection_start_epoch() == no_schedule.warmup_epochs


@pytest.mark.parametrize("overrides, match", [
    (["trainer.max_epochs=5", "model.warmup_epochs=5", "model.warmup_fraction=null", "model.clusters.split_fraction=0.7"],
     r"model.warmup_epochs=5 and model.clusters.split_fraction=0.7 leave no epoch .* final K=2 within trainer.max_epochs=5"),
    (["trainer.max_epochs=45", "model.warmup_epochs=45", "model.warmup_fraction=null"],
     r"model.warmup_epochs=45 and model.clusters.split_fraction=None leave no epoch .* within trainer.max_epochs=45"),
    (["experiment=triplet_cifar10", "trainer.max_epochs=2", "model.warmup_epochs=2", "model.warmup_fraction=null"],
     r"model.warmup_epochs=2 and model.clusters.split_fraction=None leave no epoch"),
    (["model.clusters.split_fraction=1.0"], r"model.clusters.split_fraction must be null or in \[0, 1\)"),
    (["+model.clusters.split_epoch=35"], r"model.clusters.split_epoch was replaced by model.clusters.split_fraction"),
])
def test_a_run_that_would_never_train_its_final_k_fails_in_one_line(make_cfg, overrides, match):
    from src.train import train

    cfg = make_cfg("experiment=magnet_cifar10", *FAST, "model.evaluation.tsne=false", *overrides)
    with pytest.raises(Exception, match=match) as e:  # Hydra wraps errors raised while instantiating
        train(cfg)
    root = e.value
    while root.__cause__ is not None:
        root = root.__cause__
    assert isinstance(root, ValueError) and "\n" not in str(root)


def test_short_debug_run_trains_and_tests_the_final_k(make_cfg):
    """debug=limit (3 epochs) with a K schedule: the old absolute split at epoch 35 never reached K=2 and
    tested a cross-entropy warm-up checkpoint; now the last epoch trains with K=2 and is selected."""
    from src.train import train

    cfg = make_cfg("experiment=magnet_cifar10", "debug=limit", *FAST, "model.evaluation.tsne=false",
                   "model.clusters.split_fraction=0.7", "trainer.limit_val_batches=1.0", "trainer.limit_test_batches=1.0")  # fake data: one batch each
    results = train(cfg)
    ckpt = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["epoch"] >= 2  # split at floor(0.7 * 3) = 2: only the last epoch is selectable
    labels = ckpt["cluster_state"]["index"]["centroid_labels"]
    assert torch.bincount(labels).tolist() == [2] * 10  # the selected epoch's index has K=2 per class
    assert results["test/magnet_acc"] > 0


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_and_tests_in_four_epochs(make_cfg, experiment):
    """A shortened run of any experiment as it ships (its warm-up a fraction of the run, the method's epochs under
    the rate cap) trains, stays finite and tests: issue #35's ``trainer.max_epochs=4``."""
    import math

    from src.train import train

    smaller = ["data.input_size=64"] if experiment == "magnet_cifar10_pretrained" else []
    cfg = make_cfg(f"experiment={experiment}", "trainer.max_epochs=4", *FAST, *smaller)
    results = train(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    finite = {k: v for k, v in saved.items() if k.startswith(("test/", "final_")) and isinstance(v, float)}
    assert finite and all(math.isfinite(v) for v in finite.values()), finite
    assert saved["seed"] == results["seed"]


@needs_real_data
@pytest.mark.parametrize("experiment", ["magnet_cifar10", "magnet_cifar10_hybrid", "softmax_cifar10",
                                        "triplet_cifar10", "continual_5x2"])
def test_every_from_scratch_experiment_trains_and_tests_in_four_epochs_on_real_data(make_cfg, experiment):
    """The same on the built CIFAR-10 (a 500-image subset, so the suite stays short)."""
    import math

    from src.train import train

    cfg = make_cfg(f"experiment={experiment}", "trainer.max_epochs=4", f"data.data_dir={REAL_DATA_DIR}",
                   "data.subset_size=500", "data.val_size=200", "logger=csv", "callbacks.rich_progress_bar=null",
                   "model.evaluation.tsne=false")
    results = train(cfg)
    # 4 epochs of 500 images learn little; what must hold is a finite test of the method's own read-out
    measured = {k: v for k, v in results.items() if k.startswith(("test/", "final_")) and isinstance(v, float)}
    assert measured and all(math.isfinite(v) for v in measured.values()), measured
    if experiment.startswith("magnet_cifar10"):
        assert 0 < results["test/magnet_acc"] <= 1
