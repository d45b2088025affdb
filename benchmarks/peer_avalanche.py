"""Avalanche's Naive, Replay, DER++ and iCaRL on exactly our increments, side by side with ours, from one run.

    pip install -e '.[peers]'          # avalanche-lib, pinned in pyproject.toml
    python benchmarks/peer_avalanche.py [--seed 42] [--epochs 20] [--out outputs/peer_avalanche]
    python benchmarks/peer_avalanche.py --fake       # tiny synthetic data, seconds (what the test runs)
    python benchmarks/peer_avalanche.py --runs avalanche:naive ours:softmax:der   # a subset, e.g. one per CPU core
    python benchmarks/peer_avalanche.py --runs avalanche:icarl --records docs/runs/continual   # + run folders for src.report
    python benchmarks/peer_avalanche.py --runs avalanche:replay --lr 0.005   # the lr our softmax replay and DER++ use

With --records DIR, each Avalanche run is also written as a run folder DIR/8_avalanche_<strategy>_s<seed> in
src.train's layout, so that `python -m src.report DIR` puts the peer's rows in the same generated table as ours.

Each finished run is saved to OUT/runs/<run>_s<seed>_e<epochs>_b<buffer>.json and reused by later calls with the
same --out and settings (--fresh re-runs it), so the runs can be split across processes, a cut sequence resumes at
the first missing run, and the table and figure always cover every saved run of those settings.

What is shared, so that only the library differs:
- data: the datamodule of `experiment=continual_5x2` (same 5k subset, same class order, same two classes per
  increment, the same test images and validation split) and its augmentation (random crop + flip +
  normalisation, applied per image for Avalanche);
- model: the same GoogLeNet trunk and linear head (`model=softmax`), freshly initialised with the same seed;
- optimiser: SGD with the harness's lr (or --lr's, for both libraries), momentum, Nesterov and weight decay,
  restarted with a one-cycle schedule at each increment (as our runner does), the same batch size and epochs per
  increment;
- buffers: 500 images; DER++ with alpha 0.2, beta 0.5 (the paper's Seq-CIFAR-10 buffer-500 values); iCaRL with a
  fixed memory of 500 (``fixed_memory=True``), its exemplars augmented like the training images when replayed;
- read-out: after each increment both libraries' models are scored by the same function
  (`logit_cil_til_accuracies`: argmax over the seen classes' scores, Task-IL over the increment's own). The scores are
  the logits, except for iCaRL in both libraries: minus the distance to each class's mean of exemplars (Avalanche's
  NCMClassifier, our `strategy=icarl` read-out), on the L2-normalised embedding the head sits on.

What cannot be shared: Avalanche's Replay and DER draw a second mini-batch of the same size from the buffer
at every step (so a step sees twice the images), as our softmax `replay` (`strategy.replay_mode=auto` = batch)
and DER++ do, while our magnet strategies (and `replay_dataset`, the softmax replay before 2026-11-28) add the
memory to the increment's data; Avalanche's Replay keeps a class-balanced random memory, ours a herded one. Both iCaRLs
add the exemplars to the increment's data and herd; Avalanche's keeps ceil(500 / seen classes) exemplars a class (ours
floor, so never over 500), stores them after its test-time transform and averages each class mean over the exemplars
and their mirror images (ours over the exemplars alone).
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from src.continual.runner import logit_cil_til_accuracies, seen_accuracy, summary
from src.utils.compose import compose
from src.utils.io import atomic_write_text

AVALANCHE_STRATEGIES = ("naive", "replay", "der", "icarl")
OURS = (("softmax", "naive"), ("softmax", "replay"), ("softmax", "replay_dataset"), ("softmax", "der"), ("softmax", "der_three_pass"),
        ("softmax", "icarl"), ("magnet", "replay"), ("magnet", "magnet_memory"), ("magnet", "joint"))
# our strategies under another name: DER++ with the paper's three forward passes instead of our joint one; softmax
# replay with the memory joining the epoch (as magnet models replay) instead of a memory batch appended to each step
VARIANTS = {"der_three_pass": ["strategy=der", "strategy.joint_forward=false"],
            "replay_dataset": ["strategy=replay", "strategy.replay_mode=dataset"]}
RUNS = (*(f"avalanche:{name}" for name in AVALANCHE_STRATEGIES), *(f"ours:{m}:{s}" for m, s in OURS))
FAKE = ["data=fake", "data.subset_size=null", "data.val_size=50", "data.train_per_class=30", "data.test_per_class=10",
        "callbacks.rich_progress_bar=null", "model.clusters.K=2", "model.clusters.M=3", "model.clusters.D=4", "model.warmup_epochs=0", "trainer.limit_train_batches=2"]


def base_overrides(args) -> list[str]:
    over = ["experiment=continual_5x2", f"seed={args.seed}", f"trainer.max_epochs={args.epochs}",
            "+trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null"]
    if args.lr is not None:  # both libraries' runs: only the library may differ
        over.append(f"model.optimizer.lr={args.lr}")
    return over + (FAKE if args.fake else [])


class UInt8Images(torch.utils.data.Dataset):
    """(uint8 CHW image, label) pairs with the ``targets`` list Avalanche's class-incremental generator reads."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.targets = images, labels.tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


class LogitModel(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.classifier(self.net(x))


def run_avalanche(name: str, args, out: Path) -> dict:
    import hydra
    from avalanche.benchmarks import nc_benchmark
    from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
    from avalanche.training.supervised import DER, ICaRL, Naive, Replay

    cfg = compose([*base_overrides(args), "model=softmax", "strategy=naive"], out / f"avalanche_{name}")
    torch.manual_seed(args.seed)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    T = dm.num_increments
    order = [c for t in range(T) for c in dm.classes_of_increment(t)]
    train_x, train_y = [], []
    for t in range(T):
        dm.increment = t
        x, y = dm.train_arrays()
        train_x.append(x), train_y.append(y)
    test_x, test_y = dm.test_arrays()
    transform = dm.transform
    bench = nc_benchmark(UInt8Images(torch.cat(train_x), torch.cat(train_y)), UInt8Images(test_x, test_y),
                         n_experiences=T, task_labels=False, fixed_class_order=order, seed=args.seed,
                         train_transform=lambda img: transform(img[None], train=True)[0],
                         eval_transform=lambda img: transform(img[None], train=False)[0])
    module = hydra.utils.instantiate(cfg.model)
    model = LogitModel(module.net)
    opt_cfg = cfg.model.optimizer
    batch = int(cfg.data.batch_size)

    def fresh_optimizer():
        return torch.optim.SGD(model.parameters(), lr=opt_cfg.lr, momentum=opt_cfg.momentum,
                               nesterov=opt_cfg.nesterov, weight_decay=opt_cfg.weight_decay)

    class FreshOneCycle(SupervisedPlugin):
        """A new SGD and one-cycle schedule per increment, sized to that increment's steps (our runner's rule)."""

        def before_training_exp(self, strategy, **kwargs):
            strategy.optimizer = fresh_optimizer()
            steps = max(args.epochs * len(strategy.dataloader), 10)
            self.sched = torch.optim.lr_scheduler.OneCycleLR(strategy.optimizer, max_lr=opt_cfg.lr, total_steps=steps,
                                                             pct_start=float(cfg.model.scheduler.pct_start))
            self.steps, self.total = 0, steps

        def after_training_iteration(self, strategy, **kwargs):
            self.steps += 1
            if self.steps < self.total:
                self.sched.step()

    budget = dict(optimizer=fresh_optimizer(), train_mb_size=batch, train_epochs=args.epochs, eval_mb_size=500, device="cpu",
                  plugins=[FreshOneCycle()], evaluator=EvaluationPlugin(loggers=[]))
    common = dict(model=model, criterion=torch.nn.CrossEntropyLoss(), **budget)
    mean, std = (v.cpu() for v in transform.stats_on(torch.device("cpu")))  # [1, 3, 1, 1], in uint8 units

    def replayed_exemplar(img: torch.Tensor) -> torch.Tensor:
        """Avalanche's iCaRL stores exemplars after the test-time transform (normalised floats); undo it and augment them
        as the training images are (``buffer_transform``)."""
        raw = (img[None] * std + mean).round().clamp(0, 255).to(torch.uint8)
        return transform(raw, train=True)[0]

    strategy = {"naive": lambda: Naive(**common),
                "replay": lambda: Replay(mem_size=args.buffer, **common),
                "der": lambda: DER(mem_size=args.buffer, alpha=0.2, beta=0.5, **common),
                # its own loss (ICaRLLossPlugin: BCE with the previous model's sigmoid targets) and NCM read-out
                "icarl": lambda: ICaRL(feature_extractor=module.net, classifier=module.net.classifier,
                                       memory_size=args.buffer, buffer_transform=replayed_exemplar, fixed_memory=True,
                                       **budget)}[name]()
    # what is scored: the logits, or for iCaRL the TrainEvalModel, whose eval mode gives the NCM scores
    scored = strategy.model if name == "icarl" else model
    R = {k: np.full((T, T), np.nan) for k in ("cil", "til", "cil_val")}
    seen, start = [], time.perf_counter()
    for t, experience in enumerate(bench.train_stream):
        strategy.train(experience, num_workers=0)
        model.eval(), scored.eval()
        dm.increment = t
        increments = [dm.classes_of_increment(j) for j in range(t + 1)]
        for key, (x, y) in (("test", (test_x, test_y)), ("val", dm.val_arrays(dm.seen_classes))):
            with torch.no_grad():
                logits = torch.cat([scored(transform(x[i:i + 500], train=False)) for i in range(0, len(x), 500)])
            cil, til = logit_cil_til_accuracies(logits.float(), y, dm.seen_classes, increments)
            if key == "test":
                R["cil"][t, : t + 1], R["til"][t, : t + 1] = cil, til
                seen.append(seen_accuracy(cil, y, dm, t))
            else:
                R["cil_val"][t, : t + 1] = cil
    return {"library": f"Avalanche {__import__('avalanche').__version__}", "model": "softmax", "strategy": name,
            "R": R, "final_class_il": seen[-1], "wall_s": time.perf_counter() - start, "seed": args.seed}


def run_ours(model: str, strategy: str, args, out: Path) -> dict:
    from src.train import train

    strategy_over = VARIANTS.get(strategy, [f"strategy={strategy}"])
    over = [*base_overrides(args), *strategy_over]
    if model == "softmax":
        over.append("model=softmax")
    if strategy_over[0].removeprefix("strategy=") in ("replay", "der", "magnet_memory", "icarl"):  # a variant's own strategy
        over.append(f"strategy.buffer_size={args.buffer}")
    start = time.perf_counter()
    res = train(compose(over, out / f"ours_{model}_{strategy}"))
    R = {"cil": np.array(res["class_il"]["R"], dtype=float), "til": np.array(res["task_il"]["R"], dtype=float),
         "cil_val": np.array(res["class_il_val"]["R"], dtype=float)}
    return {"library": "ours", "model": model, "strategy": strategy, "R": R,
            "final_class_il": res["final_class_il_accuracy"], "wall_s": time.perf_counter() - start, "seed": args.seed}


def no_nan(R: np.ndarray) -> list[list[float | None]]:
    """A matrix as JSON lists, its unmeasured (NaN) entries as null."""
    return [[None if math.isnan(v) else v for v in row] for row in R.tolist()]


# Avalanche's class names, for the rows of the generated table
AVALANCHE_LABELS = {"naive": "Naive", "replay": "Replay", "der": "DER", "icarl": "ICaRL"}


def write_record(row: dict, args, records: Path) -> Path:
    """An Avalanche run as a run folder src.report reads: results.json with our runner's continual keys (the same
    summary() of the same matrices), and .hydra/ with the experiment and no overrides. Its command is this script's,
    so the table's command column reproduces the peer run, not one of ours."""
    R = {k: np.asarray(v, dtype=float) for k, v in row["R"].items()}
    results = {
        "task": "peer", "experiment": "continual_5x2", "library": row["library"], "seed": row["seed"],
        "strategy": f"avalanche.training.{AVALANCHE_LABELS[row['strategy']]}",
        "strategy_label": f"Avalanche {AVALANCHE_LABELS[row['strategy']]}",
        **{key: {**summary(R[k]), "R": no_nan(R[k])} for k, key in (("cil", "class_il"), ("til", "task_il"),
                                                                      ("cil_val", "class_il_val"))},
        # per increment, the seen classes' mean (every class has as many test and validation images), for src.compare
        "table": [{"increment": t + 1, "accuracy_seen": float(np.nanmean(R["cil"][t, : t + 1])),
                   "accuracy_seen_val": float(np.nanmean(R["cil_val"][t, : t + 1]))} for t in range(len(R["cil"]))],
        "final_class_il_accuracy": float(row["final_class_il"]),
        "final_class_il_accuracy_val": float(np.nanmean(R["cil_val"][-1])),
        "time/total_s": float(row["wall_s"]),
        "command": ["python", "benchmarks/peer_avalanche.py", "--runs", f"avalanche:{row['strategy']}",
                    "--epochs", str(args.epochs), "--buffer", str(args.buffer),
                    *(["--lr", f"{args.lr:g}"] if args.lr is not None else [])],
    }
    folder = records / f"8_avalanche_{row['strategy']}_s{row['seed']}"
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / ".hydra" / "config.yaml", f"experiment_name: continual_5x2\nseed: {row['seed']}\n")
    atomic_write_text(folder / ".hydra" / "overrides.yaml", "[]\n")
    atomic_write_text(folder / "results.json", json.dumps(results, indent=1))  # last: its presence marks a finished run
    return folder


def table(rows: list[dict]) -> str:
    lines = ["| library | model | strategy | seed | final Class-IL (%) | final Class-IL, validation (%) | "
             "avg incremental acc (%) | forgetting (pts) | final Task-IL (%) | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = summary(r["R"]["cil"])
        T = r["R"]["cil"].shape[0]
        lines.append(f"| {r['library']} | {r['model']} | {r['strategy']} | {r['seed']} | {100 * r['final_class_il']:.1f} | "
                     f"{100 * np.nanmean(r['R']['cil_val'][T - 1]):.1f} | "
                     f"{100 * s['average_incremental_accuracy']:.1f} | {100 * s['forgetting']:.1f} | "
                     f"{100 * np.nanmean(r['R']['til'][T - 1]):.1f} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # tab20's strong shades first, then its light ones: distinct colours for up to 20 runs (tab10 repeats at 11)
    tab20 = plt.get_cmap("tab20")
    colours = [tab20(k) for k in (*range(0, 20, 2), *range(1, 20, 2))]
    for i, r in enumerate(rows):
        R = r["R"]["cil"]
        curve = [np.nanmean(R[t, : t + 1]) for t in range(R.shape[0])]
        style = "--" if r["library"] != "ours" else "-"
        ax.plot(range(1, len(curve) + 1), [100 * c for c in curve], style, marker="o", color=colours[i % len(colours)],
                label=f"{r['library'].split()[0]} {r['model']} {r['strategy']}")
    ax.set_xlabel("increment"), ax.set_ylabel("Class-IL accuracy on seen classes (%)")
    ax.set_xticks(range(1, rows[0]["R"]["cil"].shape[0] + 1)), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--epochs", type=int, default=20, help="per increment (continual_5x2's trainer.max_epochs)")
    ap.add_argument("--buffer", type=int, default=500)
    ap.add_argument("--lr", type=float, help="peak SGD lr for every run (default: the model config's; model=softmax: 0.01)")
    ap.add_argument("--fake", action="store_true", help="tiny synthetic data (a smoke test)")
    ap.add_argument("--only", choices=("avalanche", "ours", "all"), default="all")
    ap.add_argument("--runs", nargs="+", choices=RUNS, help="run only these (default: every run, or --only's)")
    ap.add_argument("--fresh", action="store_true", help="re-run runs already saved under OUT/runs")
    ap.add_argument("--out", type=Path, default=Path("outputs/peer_avalanche"))
    ap.add_argument("--records", type=Path, help="also write each Avalanche run as a run folder here (for src.report)")
    args = ap.parse_args(argv)
    if args.records and args.fake:
        raise SystemExit("--records with --fake would put synthetic-data runs among real ones: drop one of them")
    try:
        import avalanche  # noqa: F401
    except ImportError:
        raise SystemExit("avalanche-lib is not installed: pip install -e '.[peers]' (the optional peers group)") from None
    if args.runs is None:
        args.runs = [r for r in RUNS if args.only == "all" or r.startswith(args.only.replace("ours", "ours:"))]
    work = Path(tempfile.mkdtemp(prefix="peer_avalanche_"))
    saved = args.out / "runs"
    saved.mkdir(parents=True, exist_ok=True)
    # Everything that changes a run's result is in its file name, so a saved run is never reused for another setting.
    setting = (f"s{args.seed}_e{args.epochs}_b{args.buffer}" + (f"_lr{args.lr:g}" if args.lr is not None else "")
               + ("_fake" if args.fake else ""))
    path_of = lambda run: saved / f"{run.replace(':', '_')}_{setting}.json"  # noqa: E731
    for run in args.runs:
        if path_of(run).is_file() and not args.fresh:
            print(f"{run}: reusing {path_of(run)}")
            continue
        kind, *what = run.split(":")
        row = run_avalanche(what[0], args, work) if kind == "avalanche" else run_ours(*what, args, work)
        atomic_write_text(path_of(run), json.dumps({**row, "R": {k: no_nan(v) for k, v in row["R"].items()}}))
    rows = []
    for run in RUNS:  # every saved run of these settings, in a fixed order, whichever process produced it
        if path_of(run).is_file():
            row = json.loads(path_of(run).read_text())
            row["R"] = {k: np.array(v, dtype=float) for k, v in row["R"].items()}
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    md = table(rows)
    atomic_write_text(args.out / "table.md", md)
    atomic_write_text(args.out / "results.json", json.dumps(
        [{**r, "R": {k: no_nan(v) for k, v in r["R"].items()}} for r in rows], indent=1))
    figure(rows, args.out / "class_il.png")
    if args.records:
        for row in rows:
            if row["library"] != "ours":
                print(f"record: {write_record(row, args, args.records)}")
    print(md)
    return rows


if __name__ == "__main__":
    main()
