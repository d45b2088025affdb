from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src.data.cifar10_datamodule import default_data_dir
from src.utils.compose import compose  # noqa: F401  (re-exported for the tests)

REAL_DATA_DIR = Path(default_data_dir())  # where `make data` builds it, or $DATA_DIR
HAVE_REAL_DATA = (REAL_DATA_DIR / "cifar-10-batches-py" / "test_batch").is_file()
needs_real_data = pytest.mark.skipif(
    not HAVE_REAL_DATA,
    reason=f"built CIFAR-10 not found at {REAL_DATA_DIR}/cifar-10-batches-py (run `make data`)",
)


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(2)


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, config_name: str = "train.yaml"):
        return compose(list(overrides), tmp_path / "run", config_name)

    return _make
