"""Compare continual-learning runs: one figure with every run's Class-IL curve, one markdown table.

    python -m src.compare outputs/train/runs/continual_5x2/* [--out comparison] [--label-by strategy]

Runs of the same strategy (e.g. several seeds) are aggregated as mean ± std. Each row's final Class-IL is also given as a
ratio to the classic joint's (``strategy=joint``, label ``Joint``: every seen image each epoch, the same epochs per
increment); the joint at a memory's budget (``strategy.matched_buffer``) stays a row of its own, never the denominator."""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from src.utils.io import atomic_write_text
from src.utils.plots import accuracy_curve


def load_runs(dirs: list[str]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            print(f"skipping {d}: no results.json")
            continue
        r = json.loads(path.read_text())
        if "class_il" not in r:
            print(f"skipping {d}: not a continual run")
            continue
        # the strategy's own label (e.g. joint at a memory's budget); older runs have only the class path
        groups[r.get("strategy_label") or str(r.get("strategy", "?")).rsplit(".", 1)[-1]].append(r)
    return groups


def fmt(values: list[float], pct: bool = True) -> str:
    scale = 100 if pct else 1
    v = np.array(values, dtype=float) * scale
    return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


# the label of the classic joint (src.continual.strategies.joint.Joint.label with matched_buffer=null): the denominator
CLASSIC_JOINT = "Joint"


def final_class_il(runs: list[dict]) -> float:
    """Mean over runs of the final Class-IL accuracy (the last row of the Class-IL matrix, averaged)."""
    return float(np.mean([r["class_il"]["average_accuracy"] for r in runs]))


def ratio_to_joint(runs: list[dict], groups: dict[str, list[dict]]) -> str:
    """The runs' mean final Class-IL over the classic joint's; '–' without classic joint runs."""
    joint = groups.get(CLASSIC_JOINT)
    if not joint or not final_class_il(joint) > 0:
        return "–"
    return f"{final_class_il(runs) / final_class_il(joint):.2f}"


def table(groups: dict[str, list[dict]]) -> str:
    lines = ["| strategy | runs | final Class-IL acc (%) | ratio to joint | final Class-IL acc on validation (%) | "
             "avg incremental acc (%) | forgetting (pts) | BWT (pts) | final Task-IL acc (%) | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in groups.items():
        cil = [r["class_il"] for r in runs]
        # what settings are chosen on; runs from before validation was measured have none
        val = fmt([r["class_il_val"]["average_accuracy"] for r in runs]) if all("class_il_val" in r for r in runs) else "–"
        lines.append(
            f"| {name} | {len(runs)} | {fmt([c['average_accuracy'] for c in cil])} | {ratio_to_joint(runs, groups)} | {val} | "
            f"{fmt([c['average_incremental_accuracy'] for c in cil])} | {fmt([c['forgetting'] for c in cil])} | "
            f"{fmt([c['backward_transfer'] for c in cil])} | {fmt([r['task_il']['average_accuracy'] for r in runs])} | "
            f"{fmt([r['time/total_s'] for r in runs], pct=False)} |")
    joint = groups.get(CLASSIC_JOINT)
    lines.append("")
    lines.append(f"ratio to joint: final Class-IL over the classic joint's ({fmt([r['class_il']['average_accuracy'] for r in joint])} %, "
                 f"{len(joint)} run(s): every seen image each epoch, the same epochs per increment); a joint at a memory's "
                 "budget is a row, not the denominator" if joint else
                 "ratio to joint: no classic joint run (strategy=joint with strategy.matched_buffer=null) among these runs")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders holding results.json")
    ap.add_argument("--out", default="comparison", help="writes OUT.md and OUT.png")
    args = ap.parse_args(argv)
    groups = load_runs(args.runs)
    if not groups:
        raise SystemExit("no continual-learning results.json found in the given folders")
    md = table(groups)
    curves = {name: list(np.mean([[row["accuracy_seen"] for row in r["table"]] for r in runs], axis=0))
              for name, runs in groups.items()}
    accuracy_curve(curves, f"{args.out}.png")
    atomic_write_text(f"{args.out}.md", md)
    print(md)
    return md


if __name__ == "__main__":
    main()
