"""Finished run folders, read and summarised: shared by src.compare (continual figure and table) and src.report
(tables of every run, grouped by settings).

A run folder, as `python -m src.train` leaves it: results.json (written last, so its presence means the run
finished), config_resolved.yaml, and Hydra's .hydra/config.yaml and .hydra/overrides.yaml."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


class RunFolderError(ValueError):
    """A folder that is not a finished run folder; the message is one line naming the path and what is missing."""


def read_results(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: no such folder")
    path = run_dir / "results.json"
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: no results.json (not a finished run)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(results, dict):
        raise RunFolderError(f"{path}: not a JSON object")
    return results


def expand_run_dirs(paths: list[str]) -> list[Path]:
    """Each path as itself when it is a run (or a half-finished one, which read_run then names), else the finished
    runs directly inside it in name order, so a tracked folder of runs is one argument and one short marker line."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir() or (path / "results.json").exists() or (path / ".hydra").exists():
            runs.append(path)
            continue
        inside = sorted(d for d in path.iterdir() if (d / "results.json").is_file())
        if not inside:
            raise RunFolderError(f"{path}: neither a run (no results.json) nor a folder of finished runs")
        runs.extend(inside)
    return runs


def is_continual(results: dict) -> bool:
    return "class_il" in results


def strategy_label(results: dict) -> str:
    """The strategy's own label (e.g. joint at a memory's budget); older runs have only the class path."""
    return results.get("strategy_label") or str(results.get("strategy", "?")).rsplit(".", 1)[-1]


def mean_std(values: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    """'mean ± std' over runs (sample std, ddof=1), the value alone for one run, '–' when any run lacks it."""
    if not values or any(v is None for v in values):
        return "–"
    v = np.array(values, dtype=float) * scale
    return f"{v.mean():.{digits}f}" if len(v) == 1 else f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def fmt(values: list[float | None], pct: bool = True) -> str:
    return mean_std(values, 100 if pct else 1)


def _get(*path: str) -> Callable[[dict], Any]:
    def get(r: dict) -> Any:
        for p in path:
            r = r.get(p) if isinstance(r, dict) else None
        return r

    return get


# (header, value of one run's results.json, scale to the header's unit): the continual table's metric columns
CONTINUAL_COLUMNS: list[tuple[str, Callable[[dict], Any], float]] = [
    ("final Class-IL acc (%)", _get("class_il", "average_accuracy"), 100),
    # what settings are chosen on; runs from before validation was measured have none
    ("final Class-IL acc on validation (%)", _get("class_il_val", "average_accuracy"), 100),
    ("avg incremental acc (%)", _get("class_il", "average_incremental_accuracy"), 100),
    # no BWT column: it is minus the forgetting unless an old increment's accuracy peaks after its own increment,
    # which no Class-IL run here shows; results.json keeps it (class_il.backward_transfer)
    ("forgetting (pts)", _get("class_il", "forgetting"), 100),
    ("final Task-IL acc (%)", _get("task_il", "average_accuracy"), 100),
    ("wall time (min)", _get("time/total_s"), 1 / 60),
]


# the label of the classic joint (src.continual.strategies.joint.Joint.label with matched_buffer=null): every seen
# image each epoch, the same epochs per increment. The denominator of every ratio; a joint at a memory's budget is a
# row of its own, never the denominator.
CLASSIC_JOINT = "Joint"
RATIO_HEADER = "ratio to joint"


def final_class_il(runs: list[dict]) -> float:
    """Mean over runs of the final Class-IL accuracy (the last row of the Class-IL matrix, averaged)."""
    return float(np.mean([r["class_il"]["average_accuracy"] for r in runs]))


def ratio_to_joint(runs: list[dict], joint: list[dict] | None) -> str:
    """The runs' mean final Class-IL over the classic joint's; '–' without classic joint runs."""
    if not joint or not final_class_il(joint) > 0:
        return "–"
    return f"{final_class_il(runs) / final_class_il(joint):.2f}"


def continual_headers() -> list[str]:
    """The continual columns' headers, the ratio to joint after the final Class-IL."""
    headers = [h for h, _, _ in CONTINUAL_COLUMNS]
    return [headers[0], RATIO_HEADER, *headers[1:]]


def continual_cells(runs: list[dict], joint: list[dict] | None = None) -> list[str]:
    cells = [mean_std([get(r) for r in runs], scale) for _, get, scale in CONTINUAL_COLUMNS]
    return [cells[0], ratio_to_joint(runs, joint), *cells[1:]]


def joint_note(joint: list[dict] | None) -> str:
    """The line under a continual table that says what its ratio divides by."""
    if not joint:
        return (f"{RATIO_HEADER}: no classic joint run (strategy=joint with strategy.matched_buffer=null) among "
                "these runs")
    return (f"{RATIO_HEADER}: final Class-IL over the classic joint's ({fmt([r['class_il']['average_accuracy'] for r in joint])} %, "
            f"{len(joint)} run(s): every seen image each epoch, the same epochs per increment); a joint at a "
            "memory's budget is a row, not the denominator")
