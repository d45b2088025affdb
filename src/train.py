"""Train, then test the checkpoint chosen on validation data, and write results.json.

    python -m src.train experiment=magnet_cifar10
    python -m src.train experiment=continual_5x2 trainer.accelerator=gpu
    python -m src.train -m experiment=magnet_cifar10 model.loss.alpha=0.5,1,2,4
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from src.utils.instantiate import PROJECT_ROOT, apply_accelerator_defaults, instantiate_group, to_container
from src.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def build(cfg: DictConfig):
    """Data, model, callbacks, loggers and trainer, all from config."""
    apply_accelerator_defaults(cfg.trainer, cfg.model)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    model.output_dir = output_dir
    model.run_config = to_container(cfg)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    from src.utils.checkpoint_io import AtomicCheckpointIO

    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      plugins=[AtomicCheckpointIO()])
    for lg in loggers:
        lg.log_hyperparams(model.run_config)
    return datamodule, model, trainer


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """An explicit ckpt_path, else the run folder's last.ckpt when cfg.resume is on (restart after a kill)."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={path} does not exist; pass an existing .ckpt file or drop ckpt_path")
        return str(path)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if cfg.get("resume", True) and last.is_file():
        log.info(f"resuming from {last}")
        return str(last)
    return None


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None and ckpt_cb.best_model_path and Path(ckpt_cb.best_model_path).is_file():
        return ckpt_cb.best_model_path
    return None


def timing_summary(trainer: pl.Trainer) -> dict:
    from src.callbacks.recluster import ReclusterCallback
    from src.callbacks.timing import EpochTimer

    out = {}
    for cb in trainer.callbacks:
        if isinstance(cb, ReclusterCallback):
            out["recluster_total_s"] = cb.total_seconds
        if isinstance(cb, EpochTimer) and cb.epoch_seconds:
            out["epoch_mean_s"] = sum(cb.epoch_seconds) / len(cb.epoch_seconds)
            out["epochs_timed"] = len(cb.epoch_seconds)
    return out


def train(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("strategy"):
        from src.continual.runner import run_continual

        return run_continual(cfg)

    t0 = time.perf_counter()
    datamodule, model, trainer = build(cfg)
    ckpt = resume_checkpoint(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=False)
    fit_s = time.perf_counter() - t0
    val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    best = best_checkpoint(trainer)
    test_metrics = {}
    t1 = time.perf_counter()
    if cfg.get("test", True):
        trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=False)
        test_metrics = {f"test/{k}": v for k, v in model.test_results.items()}
    test_s = time.perf_counter() - t1
    ckpt_cb = trainer.checkpoint_callback
    results = {
        "task": cfg.get("task_name"),
        "experiment": cfg.get("experiment_name"),
        "seed": cfg.seed,
        **test_metrics,
        "val/best": None if ckpt_cb is None or ckpt_cb.best_model_score is None else float(ckpt_cb.best_model_score),
        "val/last": val_metrics,
        "best_checkpoint": best,
        "epochs": trainer.current_epoch,
        "time/fit_s": fit_s,
        "time/test_s": test_s,
        "time/total_s": time.perf_counter() - t0,
        **{f"time/{k}": v for k, v in timing_summary(trainer).items()},
        "output_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        atomic_write_json(output_dir / "results.json", results)
        log.info(f"results written to {output_dir / 'results.json'}")
    return results


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    metric = cfg.get("optimized_metric")
    return results.get(metric) if metric else None


if __name__ == "__main__":
    main()
