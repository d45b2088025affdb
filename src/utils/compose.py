"""Compose the project's Hydra config outside ``@hydra.main`` (tests, benchmarks, notebooks), the way
`python -m src.train` would, with the run's output folder set explicitly."""
from __future__ import annotations

from pathlib import Path

from src.utils.instantiate import PROJECT_ROOT


def compose(overrides: list[str], output_dir: Path, config_name: str = "train.yaml"):
    """Compose the real Hydra config, as `python -m src.train` would, into ``output_dir``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
            del cfg.hydra
    GlobalHydra.instance().clear()
    return cfg
