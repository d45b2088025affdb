"""Compare continual-learning runs: one figure with every run's Class-IL curve, one markdown table.

    python -m src.compare outputs/train/runs/continual_5x2/* [--out comparison]
    python -m src.compare docs/runs/continual --out docs/figures/continual_5x2    # a folder of runs stands for them

Runs of the same strategy (e.g. several seeds) are aggregated as mean ± std. Each row's final Class-IL is also given as a
ratio to the classic joint's (``strategy=joint``, label ``Joint``: every seen image each epoch, the same epochs per
increment); the joint at a memory's budget (``strategy.matched_buffer``) stays a row of its own, never the denominator."""
from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from src.utils.io import atomic_write_text
from src.utils.plots import accuracy_curve
from src.utils.runs import (
    CLASSIC_JOINT,
    RunFolderError,
    continual_cells,
    continual_headers,
    expand_run_dirs,
    is_continual,
    joint_note,
    read_results,
    strategy_label,
)


def load_runs(dirs: list[str]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for d in dirs:
        try:
            r = read_results(d)
        except RunFolderError as e:
            print(f"skipping {e}")
            continue
        if not is_continual(r):
            print(f"skipping {d}: not a continual run")
            continue
        groups[strategy_label(r)].append(r)
    return groups


def table(groups: dict[str, list[dict]]) -> str:
    headers = continual_headers()
    joint = groups.get(CLASSIC_JOINT)
    lines = ["| strategy | runs | " + " | ".join(headers) + " |", "|---|---|" + "---|" * len(headers)]
    for name, runs in groups.items():
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(continual_cells(runs, joint)) + " |")
    lines += ["", joint_note(joint)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders holding results.json, or folders of them")
    ap.add_argument("--out", default="comparison", help="writes OUT.md and OUT.png")
    args = ap.parse_args(argv)
    try:
        groups = load_runs([str(d) for d in expand_run_dirs(args.runs)])
    except RunFolderError as e:
        raise SystemExit(f"src.compare: {e}") from None
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
