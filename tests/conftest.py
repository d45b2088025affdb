from __future__ import annotations

import os
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
    # 2 (the machine's cores) unless TEST_THREADS says otherwise: on cores shared with training runs, two spinning
    # OpenMP threads per test slow it tenfold
    torch.set_num_threads(int(os.environ.get("TEST_THREADS", "2")))


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, config_name: str = "train.yaml"):
        return compose(list(overrides), tmp_path / "run", config_name)

    return _make


def serve_torchvision_googlenet_offline(home: Path, mp: pytest.MonkeyPatch) -> torch.nn.Module:
    """Put a randomly initialised GoogLeNet, in the layout and under the file name of torchvision's ImageNet
    weights, into a private torch cache at ``home``, and make any download attempt fail the test: the real
    ``pretrained=true`` path then runs offline. Returns the saved network."""
    from torchvision.models import GoogLeNet_Weights, googlenet

    full = googlenet(weights=None, aux_logits=True, init_weights=True)
    cache = home / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(full.state_dict(), cache / Path(GoogLeNet_Weights.IMAGENET1K_V1.url).name)
    mp.setenv("TORCH_HOME", str(home))
    mp.setattr("torch.hub.download_url_to_file", lambda *a, **k: pytest.fail("a test tried to download"))
    return full
