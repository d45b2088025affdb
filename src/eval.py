"""Re-evaluate a saved run without training.

    python -m src.eval ckpt_path=outputs/train/runs/<exp>/<time>/checkpoints/epoch_042.ckpt [split=val]
    python -m src.eval ckpt_path=outputs/train/runs/continual_5x2/<time>/continual_state.pt

A checkpoint is tested with the test-time procedure of src.train (the cluster index rebuilt from the
training embeddings with the k-means seed of the checkpoint's epoch); ``split=val`` applies the same
procedure to the validation split, which reproduces the val/acc the checkpoint was selected on.
A continual run's state is re-evaluated after its last completed increment, and its accuracy matrices
(test and validation) are written with that row measured again.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from src.utils.instantiate import PROJECT_ROOT, apply_accelerator_defaults, instantiate_group
from src.utils.io import atomic_write_json

log = logging.getLogger(__name__)
SPLITS = ("test", "val")


def describe(obj) -> str:
    """What a loaded file holds, for the error about a file that is not a saved run."""
    if isinstance(obj, dict):
        if "state_dict" in obj and "epoch" in obj:
            return "a Lightning checkpoint without this project's run config (not written by src.train)"
        if "completed" in obj and "R_cil" in obj:
            return "a continual_state.pt written before run configs were saved into it"
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return f"a plain state dict of {len(obj)} tensors"
        return f"a dict with keys {sorted(map(str, obj))[:5]}"
    return f"a {type(obj).__name__}"


def load_run_config(ckpt_path: Path) -> tuple[dict, DictConfig]:
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; point it at a .ckpt or continual_state.pt "
                                "written by src.train")
    try:
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"ckpt_path={ckpt_path} is not a torch file ({type(e).__name__}); point it at a .ckpt or "
                         "continual_state.pt written by src.train") from None
    if not isinstance(saved, dict) or "config" not in saved:
        raise ValueError(f"ckpt_path={ckpt_path} carries no run config: it is {describe(saved)}; src.eval needs a "
                         "checkpoints/*.ckpt or continual_state.pt written by src.train")
    return saved, OmegaConf.create(saved["config"])


def evaluate(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    if cfg.get("split", "test") not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {cfg.split!r}")
    ckpt_path = Path(cfg.ckpt_path)
    saved, run_cfg = load_run_config(ckpt_path)
    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("data_dir"):
        run_cfg.data.data_dir = cfg.data_dir
    apply_accelerator_defaults(cfg.trainer, run_cfg.model)
    if "completed" in saved:
        results = evaluate_continual_state(saved, run_cfg)
    else:
        results = evaluate_checkpoint(saved, run_cfg, cfg, output_dir)
    results = {"checkpoint": str(ckpt_path), **results, "time/total_s": time.perf_counter() - start,
               "output_dir": str(output_dir)}
    atomic_write_json(output_dir / "results.json", results)
    return results


def checkpoint_for_testing(checkpoint: dict, run_cfg: DictConfig, split: str) -> tuple:
    """The checkpoint's model (weights loaded), its datamodule testing on ``split``, and the re-clustering callback
    whose test-time rebuild ``trainer.test`` needs: what every re-measurement of a checkpoint starts from."""
    with open_dict(run_cfg):
        run_cfg.data.test_split = split
    datamodule = hydra.utils.instantiate(run_cfg.data)
    model = hydra.utils.instantiate(run_cfg.model)
    model.load_state_dict(checkpoint["state_dict"])
    model.on_load_checkpoint(checkpoint)
    callbacks = instantiate_group(OmegaConf.create({"recluster": run_cfg.callbacks.recluster}))
    return model, datamodule, callbacks


def evaluate_checkpoint(checkpoint: dict, run_cfg: DictConfig, cfg: DictConfig, output_dir: Path) -> dict:
    split = cfg.get("split", "test")
    model, datamodule, callbacks = checkpoint_for_testing(checkpoint, run_cfg, split)
    model.output_dir = output_dir
    model.run_config = OmegaConf.to_container(run_cfg)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")) or False)
    trainer.test(model, datamodule=datamodule)
    return {"split": split, **{f"{split}/{k}": v for k, v in model.test_results.items()}}


def evaluate_continual_state(state: dict, run_cfg: DictConfig) -> dict:
    from src.continual.runner import MATRIX_KEYS, evaluate_increment, load_state, summary

    datamodule = hydra.utils.instantiate(run_cfg.data)
    module = hydra.utils.instantiate(run_cfg.model)
    strategy = hydra.utils.instantiate(run_cfg.strategy)
    module.strategy = strategy
    datamodule.setup()
    load_state(state, module, strategy)
    t = state["completed"]
    row = evaluate_increment(module, datamodule, strategy, t)
    R = {name: state["R"][name].copy() for name in MATRIX_KEYS}
    for name in MATRIX_KEYS:
        R[name][t, : t + 1] = row[name]
    done = slice(0, t + 1)  # a run stopped early has matrices filled up to its last increment
    out = {"completed_increments": t + 1, "reevaluated_increment": t + 1}
    for name, key in MATRIX_KEYS.items():
        out[key] = {"R": R[name], "row_as_saved": state["R"][name][t, : t + 1].tolist(), **summary(R[name][done, done])}
    return out


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
