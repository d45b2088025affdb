"""Re-evaluate a checkpoint without training: rebuild the cluster index from the training embeddings
and write the same test metrics and t-SNE as src.train.

    python -m src.eval ckpt_path=outputs/train/runs/<exp>/<time>/checkpoints/last.ckpt
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from src.utils.instantiate import PROJECT_ROOT, apply_accelerator_defaults, instantiate_group
from src.utils.io import atomic_write_json

log = logging.getLogger(__name__)


def load_run_config(ckpt_path: Path) -> tuple[dict, DictConfig]:
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; point it at a .ckpt written by src.train")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if "config" not in checkpoint:
        raise ValueError(f"{ckpt_path} carries no run config; it was not written by src.train")
    return checkpoint, OmegaConf.create(checkpoint["config"])


def evaluate(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    ckpt_path = Path(cfg.ckpt_path)
    checkpoint, run_cfg = load_run_config(ckpt_path)
    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("data_dir"):
        run_cfg.data.data_dir = cfg.data_dir
    apply_accelerator_defaults(cfg.trainer, run_cfg.model)
    datamodule = hydra.utils.instantiate(run_cfg.data)
    model = hydra.utils.instantiate(run_cfg.model)
    model.load_state_dict(checkpoint["state_dict"])
    model.on_load_checkpoint(checkpoint)
    model.output_dir = output_dir
    model.run_config = OmegaConf.to_container(run_cfg)
    callbacks = instantiate_group(OmegaConf.create({"recluster": run_cfg.callbacks.recluster}))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")) or False)
    trainer.test(model, datamodule=datamodule)
    results = {"checkpoint": str(ckpt_path), **{f"test/{k}": v for k, v in model.test_results.items()},
               "time/total_s": time.perf_counter() - start, "output_dir": str(output_dir)}
    atomic_write_json(output_dir / "results.json", results)
    return results


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
