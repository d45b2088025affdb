"""Hydra helpers shared by the entry points."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))


def instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a config group that has a ``_target_`` (callbacks, loggers)."""
    out = []
    if not cfg:
        return out
    for name, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info(f"instantiating {name} <{conf._target_}>")
            out.append(hydra.utils.instantiate(conf))
    return out


def apply_accelerator_defaults(cfg: DictConfig) -> None:
    """On a GPU: bf16 mixed precision and channels_last unless the user chose otherwise."""
    accel = str(cfg.trainer.get("accelerator", "cpu"))
    on_gpu = accel in ("gpu", "cuda")
    with open_dict(cfg):
        if cfg.trainer.get("precision") in (None, "auto"):
            cfg.trainer.precision = "bf16-mixed" if on_gpu else "32-true"
        net = cfg.model.get("net")
        if net is not None and net.get("channels_last") in (None, "auto"):
            net.channels_last = on_gpu


def open_dict(cfg: DictConfig):
    from omegaconf import open_dict as _open_dict

    return _open_dict(cfg)


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
