from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from src.utils.instantiate import PROJECT_ROOT

REAL_DATA_DIR = Path(os.environ.get("DATA_DIR", PROJECT_ROOT / "data"))
HAVE_REAL_DATA = (REAL_DATA_DIR / "cifar-10-batches-py" / "test_batch").is_file()
needs_real_data = pytest.mark.skipif(
    not HAVE_REAL_DATA,
    reason=f"built CIFAR-10 not found at {REAL_DATA_DIR}/cifar-10-batches-py (run `make data`)",
)


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(2)


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


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, config_name: str = "train.yaml"):
        return compose(list(overrides), tmp_path / "run", config_name)

    return _make
