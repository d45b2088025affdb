"""Markdown tables of finished runs, one row per setting, mean ± std over its seeds, each with the command that
reproduces it.

    python -m src.report outputs/train/runs/*/* outputs/train/multiruns/*/*/[0-9]*   # to stdout
    python -m src.report RUN_DIR... --out docs/results.md                            # written atomically
    python -m src.report RUN_DIR... --into README.md --table metric_learning --attr-k 10
                     # replaces the block between <!-- TABLE:metric_learning --> and <!-- /TABLE:metric_learning -->

Each RUN_DIR is a folder `python -m src.train` wrote: results.json and Hydra's .hydra/config.yaml and
.hydra/overrides.yaml; a folder of finished runs (docs/runs/continual) stands for them, in name order. Runs are
grouped by experiment (experiment_name; for continual runs also the strategy's label) and by their command-line
overrides, less the seed and the few keys that do not change what is trained (NON_SEMANTIC). Metric-learning and continual runs get one table each. Std is the sample std (ddof=1); a
setting with one run shows its value alone. A folder that is not a finished run stops the report with one line
naming it and what it lacks."""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from src.utils.io import atomic_write_text
from src.utils.runs import (
    CLASSIC_JOINT,
    RunFolderError,
    continual_cells,
    continual_headers,
    expand_run_dirs,
    is_continual,
    joint_note,
    mean_std,
    read_results,
    strategy_label,
)

# overrides that never change what a run trains or measures: they do not split a group (keys, and key prefixes)
NON_SEMANTIC = ("seed", "resume", "trainer.devices", "logger")
NON_SEMANTIC_PREFIXES = ("paths.", "hydra.", "logger.")

# (header, results.json key, scale, digits, always shown): metric-learning columns; optional ones appear only when
# some run in the table has the key (softmax and triplet runs have no magnet accuracy, NCM exists in some runs only)
METRIC_COLUMNS: list[tuple[str, str, float, int, bool]] = [
    ("test magnet acc (%)", "test/magnet_acc", 100, 1, False),
    ("test softmax acc (%)", "test/softmax_acc", 100, 1, False),
    ("1-NN (%)", "test/knn_acc", 100, 1, False),
    ("NMI", "test/nmi", 1, 3, False),
    ("MAP@R", "test/map_at_r", 1, 3, False),
    ("NCM acc (%)", "test/ncm_acc", 100, 1, False),
    ("best val (%)", "val/best", 100, 1, True),
    ("wall time (min)", "time/total_s", 1 / 60, 1, True),
]
ATTR = re.compile(r"^test/attr_conc(_xclass)?@(\d+)$")


@dataclass
class Run:
    path: Path
    results: dict[str, Any]
    config: dict[str, Any]
    overrides: list[str]

    @property
    def seed(self) -> Any:
        return self.results.get("seed", self.config.get("seed"))


@dataclass
class Group:
    kind: str  # "metric" or "continual"
    experiment: str
    strategy: str | None
    settings: list[str]  # the semantic overrides, in the first run's order
    runs: list[Run] = field(default_factory=list)


def override_key(override: str) -> str:
    """`+a.b=1` -> `a.b`; `~logger` -> `logger`."""
    return override.lstrip("~+").split("=", 1)[0].split("@", 1)[0]


def semantic(override: str) -> bool:
    key = override_key(override)
    return key not in NON_SEMANTIC and not key.startswith(NON_SEMANTIC_PREFIXES)


def read_yaml(path: Path, what: type) -> Any:
    if not path.is_file():
        raise RunFolderError(f"{path.parent.parent}: no .hydra/{path.name} (Hydra's record of the run's config)")
    try:
        value = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RunFolderError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    value = what() if value is None else value
    if not isinstance(value, what):
        raise RunFolderError(f"{path}: expected a YAML {what.__name__}")
    return value


def read_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    results = read_results(run_dir)
    config = read_yaml(run_dir / ".hydra" / "config.yaml", dict)
    overrides = [str(o) for o in read_yaml(run_dir / ".hydra" / "overrides.yaml", list)]
    return Run(run_dir, results, config, overrides)


def readout_views(run: Run) -> list[Run]:
    """A continual run measured by several read-outs (model.readout=ncm, iCaRL: the nearest class mean first, the
    head beside it) as one Run per read-out, so that each is a row: the primary read-out as written, every other with
    its own matrices and final accuracies in place of the primary's and a label that names it. The same training,
    so the same wall time and command."""
    others = [r for r in (run.results.get("readouts") or {}) if r != run.results.get("readout")]
    if not is_continual(run.results) or not others:
        return [run]
    base = strategy_label(run.results).removesuffix(" (NCM read-out)")
    views = [run]
    for name in others:
        results = {**run.results, **run.results["readouts"][name], "readout": name,
                   "strategy_label": f"{base} ({name} read-out of the same runs)"}
        views.append(Run(run.path, results, run.config, run.overrides))
    return views


def group_runs(runs: list[Run]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for run in (view for r in runs for view in readout_views(r)):
        kind = "continual" if is_continual(run.results) else "metric"
        experiment = str(run.config.get("experiment_name") or run.results.get("experiment") or "?")
        strategy = strategy_label(run.results) if kind == "continual" else None
        settings = [o for o in run.overrides if semantic(o)]
        key = (kind, experiment, strategy, tuple(sorted(settings)))
        groups.setdefault(key, Group(kind, experiment, strategy, settings)).runs.append(run)
    return list(groups.values())


def seeds_of(group: Group) -> list[Any]:
    seeds = []
    for s in (r.seed for r in group.runs):
        if s not in seeds:
            seeds.append(s)
    return sorted(seeds, key=lambda s: (not isinstance(s, int), s if isinstance(s, int) else str(s)))


def command(group: Group) -> str:
    """The first run's overrides as written, less its seed and any non-semantic override the runs disagree on,
    then every seed of the group (a multirun when there are several). A peer's run carries its own command."""
    seeds = seeds_of(group)
    peer = group.runs[0].results.get("command")  # a peer library's run (benchmarks/peer_avalanche.py --records)
    if peer:
        if len(seeds) == 1:
            return shlex.join([*peer, "--seed", str(seeds[0])])
        return f"for s in {' '.join(map(str, seeds))}; do {shlex.join(peer)} --seed $s; done"
    first = group.runs[0].overrides
    kept = [o for o in first if override_key(o) != "seed"
            and (semantic(o) or all(o in r.overrides for r in group.runs))]
    words = ["python", "-m", "src.train", *(["-m"] if len(seeds) > 1 else []), *kept,
             "seed=" + ",".join(str(s) for s in seeds)]
    return shlex.join(words)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def code(text: str) -> str:
    return f"`{cell(text)}`"


def settings_cell(group: Group) -> str:
    shown = [o for o in group.settings if override_key(o) != "experiment"]
    return " ".join(code(o) for o in shown) or "(defaults)"


def metric_table(groups: list[Group], attr_k: list[int] | None = None) -> str:
    results = [r.results for g in groups for r in g.runs]
    present = {k for r in results for k, v in r.items() if v is not None
               and not (ATTR.match(k) and attr_k is not None and int(ATTR.match(k)[2]) not in attr_k)}
    columns = [(h, k, s, d) for h, k, s, d, always in METRIC_COLUMNS if always or k in present]
    attrs = sorted((k for k in present if ATTR.match(k)), key=lambda k: (bool(ATTR.match(k)[1]), int(ATTR.match(k)[2])))
    at = next(i for i, c in enumerate(columns) if c[1] == "val/best")  # before best val, as in the README's tables
    columns[at:at] = [(("x-class " if ATTR.match(k)[1] else "") + f"attr. conc.@{ATTR.match(k)[2]}", k, 1, 3)
                      for k in attrs]
    lines = ["| experiment | settings | seeds | " + " | ".join(h for h, *_ in columns) + " | command |",
             "|---|---|---|" + "---|" * len(columns) + "---|"]
    for g in groups:
        cells = [mean_std([r.results.get(k) for r in g.runs], scale, digits) for _, k, scale, digits in columns]
        lines.append(f"| {cell(g.experiment)} | {settings_cell(g)} | {len(g.runs)} | " + " | ".join(cells)
                     + f" | {code(command(g))} |")
    return "\n".join(lines) + "\n"


def continual_table(groups: list[Group]) -> str:
    headers = continual_headers()
    # the classic joint of the same experiment is every row's denominator (its default settings' runs)
    joint = [r.results for g in groups if g.strategy == CLASSIC_JOINT
             and all(override_key(o) in ("experiment", "strategy") for o in g.settings) for r in g.runs] or None
    # no settings column: a continual row's settings are its strategy's, and the command spells them out in full
    lines = ["| experiment | strategy | seeds | " + " | ".join(headers) + " | command |",
             "|---|---|---|" + "---|" * len(headers) + "---|"]
    for g in groups:
        lines.append(f"| {cell(g.experiment)} | {cell(g.strategy or '?')} | {len(g.runs)} | "
                     + " | ".join(continual_cells([r.results for r in g.runs], joint)) + f" | {code(command(g))} |")
    return "\n".join(lines) + "\n\n" + joint_note(joint) + "\n"


def report(run_dirs: list[str], args: list[str] | None = None, attr_k: list[int] | None = None,
           headings: bool = True) -> str:
    groups = group_runs([read_run(d) for d in expand_run_dirs(run_dirs)])
    marker = f"python -m src.report {shlex.join(run_dirs if args is None else args)}"
    parts = [f"<!-- generated by: {marker} — do not edit by hand -->\n"]
    metric = [g for g in groups if g.kind == "metric"]
    continual = [g for g in groups if g.kind == "continual"]
    if metric:
        parts.append(("## Metric learning\n\n" if headings else "") + metric_table(metric, attr_k))
    if continual:
        parts.append(("## Continual learning\n\n" if headings else "") + continual_table(continual))
    return "\n".join(parts)


def replace_table(document: str, name: str, table: str, path: str) -> str:
    """``document`` with the lines between ``<!-- TABLE:name -->`` and ``<!-- /TABLE:name -->`` (or, the first
    time, after the opening marker alone) replaced by ``table``."""
    start, end = f"<!-- TABLE:{name} -->", f"<!-- /TABLE:{name} -->"
    if document.count(start) != 1:
        raise RunFolderError(f"{path}: needs exactly one line {start} where the table goes (found {document.count(start)})")
    head, rest = document.split(start, 1)
    tail = rest.split(end, 1)[1] if end in rest else rest
    return f"{head}{start}\n{table.rstrip()}\n{end}{tail}"


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m src.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (each with results.json and .hydra/), or folders of them")
    ap.add_argument("--out", help="write the markdown here (atomically) instead of printing it")
    ap.add_argument("--into", help="a markdown file whose <!-- TABLE:NAME --> block the table replaces (atomically)")
    ap.add_argument("--table", help="with --into: the NAME of the block")
    ap.add_argument("--attr-k", type=int, nargs="+", help="attribute-concentration columns only for these k")
    args = ap.parse_args(argv)
    if bool(args.into) != bool(args.table):
        raise SystemExit("src.report: --into and --table go together (the file and the name of its TABLE block)")
    try:
        md = report(args.runs, argv, attr_k=args.attr_k, headings=not args.into)
        if args.into:
            document = Path(args.into).read_text() if Path(args.into).is_file() else ""
            atomic_write_text(args.into, replace_table(document, args.table, md, args.into))
            return md
    except RunFolderError as e:
        raise SystemExit(f"src.report: {e}") from None
    if args.out:
        atomic_write_text(args.out, md)
    else:
        print(md, end="")
    return md


if __name__ == "__main__":
    main()
