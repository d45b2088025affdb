"""benchmarks/peer_avalanche.py on tiny synthetic data; needs the optional `peers` group (avalanche-lib)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("avalanche") is None,
                                reason="avalanche-lib not installed (pip install -e '.[peers]')")


def test_peer_script_runs_both_libraries_on_the_same_increments(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import peer_avalanche
    finally:
        sys.path.pop(0)
    rows = peer_avalanche.main(["--fake", "--epochs", "2", "--buffer", "20", "--out", str(tmp_path)])
    libraries = [r["library"].split()[0] for r in rows]
    assert libraries.count("Avalanche") == len(peer_avalanche.AVALANCHE_STRATEGIES) == 4
    assert libraries.count("ours") == len(peer_avalanche.OURS)
    for r in rows:
        R = r["R"]["cil"]
        assert R.shape == (5, 5) and np.isfinite(R[np.tril_indices(5)]).all() and np.isnan(R[np.triu_indices(5, 1)]).all()
        assert 0.0 <= r["final_class_il"] <= 1.0
    table = (tmp_path / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and "Avalanche 0.6.0 | softmax | der" in "\n".join(table)
    assert "Avalanche 0.6.0 | softmax | icarl" in "\n".join(table) and "| ours | softmax | icarl |" in "\n".join(table)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved[0]["R"]["cil"][0][1] is None  # upper triangle written as null, not NaN
    assert (tmp_path / "class_il.png").is_file()
    # A later call with a subset reuses the saved runs (no retraining: identical wall times) and still tables them all.
    again = peer_avalanche.main(["--fake", "--epochs", "2", "--buffer", "20", "--out", str(tmp_path),
                                 "--runs", "avalanche:naive"])
    assert [r["wall_s"] for r in again] == [r["wall_s"] for r in rows]
