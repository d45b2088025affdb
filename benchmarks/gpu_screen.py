"""Many short training runs side by side on one GPU: a hyper-parameter screen inside the `device` tool's 15 minutes.

A continual_5x2 sequence is launch-bound on a GPU (batches of 48 images at 32 px), so one run leaves the device
mostly idle. Fourteen at once on the H200 (16 cores, one thread each) each took 316 s, about what one run takes
at one thread on the 2-core CPU beside two others: some 10x the CPU's throughput for a screen (measured 2026-11-30, commit 389aaf7).

Each line of the jobs file is `NAME SEEDS OVERRIDES...` (SEEDS comma-separated; `#` starts a comment); jobs run
in file order, every seed of a line before the next line, so a cut lease still has whole configurations.
No job starts once it could not end before --kill-at (judged by the median run so far); at --kill-at the rest
are killed. As each job ends, a row goes to OUT/summary.tsv (name, wall s, final Class-IL test, validation)
and the run's accuracy matrices to OUT/results.jsonl, so what ended comes back even from a cut command.
Three failed jobs abort the screen (the first one's log tail is in OUT/fails.log).

The device machine lacks Hydra, OmegaConf and FAISS, and the JPEG copy of CIFAR-10 (benchmarks/gpu_checks.sh's
header says how to carry them as .whl/ and .gpu/shared_data). Then, with carry [".whl", ".gpu"]:
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD;
  python3 .gpu/shared_data/build_cifar10.py data >/dev/null; python3 benchmarks/gpu_screen.py JOBS --out $OUT

Screens on the GPU run in fp32 (trainer.precision=32-true) but do not reproduce CPU numbers (other kernels): a
candidate that passes a GPU screen is confirmed on the CPU before anything is adopted.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["experiment=continual_5x2", "trainer.accelerator=gpu", "trainer.precision=32-true",
          "callbacks.rich_progress_bar=null", "+trainer.enable_progress_bar=false", "data.data_dir=data"]


def read_jobs(path: Path) -> list[tuple[str, list[str]]]:
    jobs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = shlex.split(line)
        if len(fields) < 2 or not all(s.isdigit() for s in fields[1].split(",")):
            raise SystemExit(f"{path}:{number}: expected 'NAME SEEDS OVERRIDES...' with SEEDS like 42,43,44, got {line!r}")
        name, seeds, *overrides = fields
        jobs += [(f"{name}_s{seed}", [f"seed={seed}", *overrides]) for seed in seeds.split(",")]
    return jobs


def record(out: Path, name: str, wall: float, run_dir: Path) -> str:
    r = json.loads((run_dir / "results.json").read_text())
    test, val = 100 * r["final_class_il_accuracy"], 100 * r["final_class_il_accuracy_val"]
    with open(out / "summary.tsv", "a") as f:
        f.write(f"{name}\t{wall:.0f}\t{test:.2f}\t{val:.2f}\n")
    keys = ("class_il", "task_il", "class_il_val", "task_il_val", "final_class_il_accuracy", "final_class_il_accuracy_val")
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps({"name": name, "wall": wall, **{k: r[k] for k in keys}}) + "\n")
    return f"test {test:.2f} val {val:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jobs", type=Path)
    ap.add_argument("--out", type=Path, default=Path("outputs/gpu_screen"))
    ap.add_argument("--runs", type=Path, default=Path("/tmp/gpu_screen_runs"), help="run folders (not brought back)")
    ap.add_argument("-P", "--parallel", type=int, default=14, help="runs at once (one CPU thread each)")
    ap.add_argument("--kill-at", type=float, default=520, help="seconds after the start; keep it under the run's timeout_s")
    ap.add_argument("--common", default=" ".join(COMMON), help="overrides every job gets before its own")
    a = ap.parse_args()
    queue = read_jobs(a.jobs)
    a.out.mkdir(parents=True, exist_ok=True)
    a.runs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    start, live, walls, failures = time.time(), {}, [], 0

    def say(message: str) -> None:
        print(f"[{time.time() - start:5.0f} s] {message}", flush=True)

    while queue or live:
        now = time.time() - start
        if now > a.kill_at:
            for name, (proc, _) in live.items():
                proc.kill()
                say(f"killed {name}")
            break
        expected = sorted(walls)[len(walls) // 2] if walls else 0.0
        while queue and len(live) < a.parallel and now + expected < a.kill_at:
            name, overrides = queue.pop(0)
            cmd = [sys.executable, "-m", "src.train", *shlex.split(a.common), *overrides, f"hydra.run.dir={a.runs / name}"]
            with open(a.runs / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
                live[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time())
            say(f"start {name}: {' '.join(overrides)}")
        if not live:
            break
        time.sleep(2)
        for name in [n for n, (proc, _) in live.items() if proc.poll() is not None]:
            proc, began = live.pop(name)
            wall = time.time() - began
            if proc.returncode == 0 and (a.runs / name / "results.json").is_file():
                walls.append(wall)
                say(f"done {name} in {wall:.0f} s: {record(a.out, name, wall, a.runs / name)}")
                continue
            failures += 1
            with open(a.out / "fails.log", "a") as f:
                f.write(f"==== {name} rc={proc.returncode} after {wall:.0f} s\n{(a.runs / f'{name}.log').read_text()[-3000:]}\n")
            say(f"FAILED {name} (rc {proc.returncode}); log tail in {a.out / 'fails.log'}")
            if failures == 3:
                for other, _ in live.values():
                    other.kill()
                raise SystemExit("three jobs failed: screen aborted")
    say(f"{len(walls)} jobs ended, {failures} failed, {len(queue)} never started")


if __name__ == "__main__":
    main()
