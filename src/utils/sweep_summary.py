"""Hydra callback: after every job of a multirun, (re)write the sweep summary from each job's
results.json, so it is complete even when a job fails or the sweep is interrupted.

Writes into the sweep folder: summary.csv, summary.md and summary.png (test metrics against the
swept parameter, one point per run). A failed job appears as a row with status 'failed' and its error."""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from src.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
METRICS = ["test/magnet_acc", "test/knn_acc", "test/nmi", "test/map_at_r", "test/softmax_acc", "val/best"]


def read_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        row: dict[str, Any] = {"job": int(job.name), "overrides": " ".join(overrides)}
        row.update(dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith(("experiment=", "hydra."))))
        if (job / "results.json").is_file():
            results = json.loads((job / "results.json").read_text())
            row["status"] = "ok"
            row.update({m: results.get(m) for m in METRICS if results.get(m) is not None})
        elif (job / "failed.json").is_file():
            row.update({"status": "failed", "error": json.loads((job / "failed.json").read_text())["error"]})
        else:
            row["status"] = "running"
        rows.append(row)
    return rows


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys = [k for k in rows[0] if k not in ("job", "overrides", "status", "error", *METRICS)] if rows else []
    return [k for k in keys if len({str(r.get(k)) for r in rows}) > 1] or keys


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = read_jobs(sweep_dir)
    if not rows:
        return rows
    params = swept_keys(rows)
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    columns = ["job", *params, "status", *metrics, "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep_dir / "summary.csv", buf.getvalue())

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v).replace("|", "/"))

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    atomic_write_text(sweep_dir / "summary.md", "\n".join(md) + "\n")
    atomic_write_json(sweep_dir / "summary.json", rows)
    if len(params) == 1:
        plot(rows, params[0], metrics, sweep_dir / "summary.png")
    return rows


def plot(rows, param: str, metrics: list[str], path: Path) -> None:
    from src.utils.plots import metric_vs_param

    done = [r for r in rows if r["status"] == "ok"]
    try:
        xs = [float(r[param]) for r in done]
    except (TypeError, ValueError):
        return  # a non-numeric parameter: the table says it all
    order = sorted(range(len(xs)), key=xs.__getitem__)
    series = {m: [done[i].get(m, float("nan")) for i in order] for m in metrics if m.startswith("test/")}
    if series and done:
        metric_vs_param([xs[i] for i in order], series, path, xlabel=param)


class SweepSummary(Callback):
    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        hydra_cfg = config.hydra
        if str(hydra_cfg.mode) != "RunMode.MULTIRUN":
            return
        job_dir = Path(hydra_cfg.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            err = job_return._return_value
            while err.__cause__ is not None:  # Hydra wraps the user's error; report the root cause
                err = err.__cause__
            atomic_write_json(job_dir / "failed.json", {"error": f"{type(err).__name__}: {err}".splitlines()[0]})
        sweep_dir = Path(hydra_cfg.sweep.dir)
        try:
            write_summary(sweep_dir)
            log.info(f"sweep summary updated: {sweep_dir / 'summary.md'}")
        except Exception as e:  # a summary problem must never take the sweep down
            log.warning(f"could not write the sweep summary: {e}")
