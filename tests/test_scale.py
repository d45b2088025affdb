"""Sweeps, wandb offline, checkpoint resume and DDP on CPU."""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.utils.instantiate import PROJECT_ROOT
from tests.conftest import compose

FAKE = ["data=fake", "data.subset_size=null", "callbacks.rich_progress_bar=null", "model.evaluation.tsne=false"]


def run_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, "-m", "src.train", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_alpha_sweep_writes_summary_and_survives_a_failed_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "experiment=magnet_cifar10", "debug=fdr", *FAKE, "model.loss.alpha=0.5,-1,2",
                    f"hydra.sweep.dir={sweep}"])
    # alpha=-1 is invalid: Hydra reports the failure at the end, after the other jobs ran
    assert proc.returncode != 0, proc.stdout[-2000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["model.loss.alpha"] for r in rows] == ["0.5", "-1", "2"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "alpha must be >= 0" in rows[1]["error"]
    for r in (rows[0], rows[2]):
        assert 0 <= float(r["test/magnet_acc"]) <= 1
    md = (sweep / "summary.md").read_text()
    assert "| job | model.loss.alpha | status |" in md and "failed" in md
    assert (sweep / "summary.png").stat().st_size > 1000


def test_optuna_search_config_composes_and_optimizes_validation():
    cfg = compose(["hparams_search=magnet_optuna", "experiment=magnet_cifar10"], Path("/tmp/unused"))
    assert cfg.optimized_metric == "val/best"


def test_wandb_offline_run_leaves_a_local_folder(make_cfg, monkeypatch):
    from src.train import train

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    # not fast_dev_run: it replaces every logger with a dummy
    cfg = make_cfg("experiment=magnet_cifar10", *FAKE, "logger=wandb", "trainer.max_epochs=1", "model.warmup_epochs=0", "model.warmup_fraction=null",
                   "trainer.limit_train_batches=2", "model.clusters.M=4", "model.clusters.D=4")
    assert cfg.logger.wandb.offline is True
    train(cfg)
    import wandb

    wandb.finish()
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert runs, "no offline wandb run folder"
    records = list(runs[0].glob("run-*.wandb"))
    assert records, "no .wandb record file in the offline run folder"
    # wandb's service process writes the record file asynchronously: under load it may still be flushing
    deadline = time.monotonic() + 60
    while True:
        data = records[0].read_bytes()
        if (b"test/magnet_acc" in data and b"val/acc" in data) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert b"test/magnet_acc" in data and b"val/acc" in data  # metrics were recorded


def test_resume_after_interruption_reaches_the_same_metrics(tmp_path, monkeypatch):
    from src.callbacks.timing import EpochTimer
    from src.train import train

    args = ["experiment=magnet_cifar10", *FAKE, "trainer.max_epochs=3", "model.warmup_epochs=1", "model.warmup_fraction=null", "model.clusters.K=2", "model.clusters.split_fraction=null",
            "model.clusters.M=4", "model.clusters.D=4", "data.train_per_class=30", "data.val_size=50"]
    full = train(compose(args, tmp_path / "full"))

    original = EpochTimer.on_train_epoch_start

    def killed_at_epoch_2(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise RuntimeError("simulated kill")
        return original(self, trainer, pl_module)

    monkeypatch.setattr(EpochTimer, "on_train_epoch_start", killed_at_epoch_2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(compose(args, tmp_path / "resumed"))
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 1  # saved after epoch 1, the last completed one
    monkeypatch.setattr(EpochTimer, "on_train_epoch_start", original)
    resumed = train(compose(args, tmp_path / "resumed"))  # same command, same folder -> continues
    assert resumed["epochs"] == full["epochs"] == 3
    for key in ("test/magnet_acc", "test/knn_acc", "test/map_at_r", "val/best"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key


def test_checkpoint_written_atomically(tmp_path, monkeypatch):
    from src.utils.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "a.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"x": torch.arange(3)}, path)
    good = path.read_bytes()

    def crash(*a, **k):
        raise OSError("disk died mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"x": torch.arange(1000)}, path)
    assert path.read_bytes() == good  # the old checkpoint is untouched and no temp file is left
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


def test_ddp_two_cpu_processes_share_one_index(tmp_path):
    out = tmp_path / "ddp"
    proc = run_cli(["experiment=magnet_cifar10", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                    *FAKE, "trainer.max_epochs=2", "model.warmup_epochs=1", "model.warmup_fraction=null", "model.clusters.K=2", "model.clusters.split_fraction=null", "model.clusters.M=4",
                    "model.clusters.D=4", "data.train_per_class=30", "data.val_size=50", f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [(out / f"index_digest_rank{r}.txt").read_text().split("\n") for r in (0, 1)]
    assert digests[0] == digests[1] and len([d for d in digests[0] if d]) >= 2
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["test/magnet_acc"] <= 1
