"""GPU speed of the training step and the magnet loop, from one run on one card (issue #11; stems for #12).

    python benchmarks/gpu_speed.py                       # everything below, on cuda, full data, heaviest last
    python benchmarks/gpu_speed.py --parts bare loop     # a subset
    python benchmarks/gpu_speed.py --device cpu --steps 3 --subset 2000 --no-compile --parts bare loop recluster
                                                         # a CPU smoke run (what the test runs, on fake data)

Parts, each printed as soon as it is measured (so a run cut by a time limit still leaves the earlier figures):
1. ``bare``: images/s of a bare cross-entropy step of the GoogLeNet embedding net (random data, batch
   ``--batch``, channels_last, bf16 autocast on a GPU), eager and compiled, for every ``--stems`` entry;
2. ``loop``: images/s of the full magnet training loop through Lightning (neighbourhood batches of M x D =
   ``--md``, per-example losses, sampler, metrics), eager and ``model.compile=true``, and its ratio to the
   compiled bare step of the first stem (target >= 0.8);
3. ``recluster``: the re-clustering time (embedding pass with BatchNorm re-estimation + per-class FAISS k-means)
   for the whole training set (49,000 images with ``--subset 0``), and its share of an epoch at the loop's speed
   (target <= 10 %);
4. ``full``: wall time of ``python -m src.train experiment=magnet_cifar10`` on full data with the loop's batch
   shape and ``model.compile``, 50 epochs, re-clustering, validation and test included (target <= 3 min), and
   its test accuracy.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from src.data.cifar10_datamodule import default_data_dir

HAVE_REAL_DATA = (Path(default_data_dir()) / "cifar-10-batches-py" / "test_batch").is_file()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def bare_step(stem: str, device: torch.device, batch: int, steps: int, compiled: bool, warmup: int = 5) -> float:
    """images/s of a bare cross-entropy training step (forward, backward, SGD) on random data."""
    from src.models.components.backbone import EmbeddingNet

    torch.manual_seed(0)
    net = EmbeddingNet(channels_last=True, stem=stem).to(device)
    if compiled:
        net.compile(mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(net.classifier(net(x)), y)
        loss.backward()
        opt.step()

    for _ in range(warmup):  # compilation, CUDA-graph recording, allocator warm-up
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def data_overrides(args) -> list[str]:
    if HAVE_REAL_DATA:
        return [f"data.subset_size={args.subset or 'null'}"]
    return ["data=fake", "data.subset_size=null", f"data.train_per_class={max(args.subset // 10, 100) if args.subset else 600}"]


def loop_overrides(args, compiled: bool) -> list[str]:
    m, d = args.md
    return ["experiment=magnet_cifar10", *data_overrides(args), f"model.clusters.M={m}", f"model.clusters.D={d}",
            f"data.batch_size={m * d}", f"model.compile={str(compiled).lower()}",
            f"callbacks.recluster.batch_size={args.embed_batch}",
            f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}"]


def magnet_loop(args, compiled: bool):
    """images/s of the magnet training loop through Lightning (K = 2 from the first epoch, no warm-up)."""
    import hydra
    import pytorch_lightning as pl
    from magnet_speed import StepTimer  # benchmarks/, beside this script

    from src.callbacks.recluster import ReclusterCallback
    from src.utils.compose import compose
    from src.utils.instantiate import apply_accelerator_defaults

    device = torch.device(args.device)
    cfg = compose([*loop_overrides(args, compiled), "model.warmup_epochs=0", "model.warmup_fraction=null", "model.clusters.split_fraction=null",
                   "model.evaluation.tsne=false"], tempfile.mkdtemp())
    apply_accelerator_defaults(cfg.trainer, cfg.model)
    dm = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    skip = 5 if not compiled else 10  # compiled: the first steps compile and record the graphs
    timer = StepTimer(skip, last=skip + args.steps - 1, sync=lambda: synchronize(device))
    recluster = ReclusterCallback(seed=0, batch_size=args.embed_batch)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=skip + args.steps, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer, recluster], accelerator=cfg.trainer.accelerator,
                         precision=cfg.trainer.precision, devices=1)
    trainer.fit(model, datamodule=dm)
    return timer.images / timer.seconds, trainer, model, recluster


def recluster_time(trainer, model, recluster, repeats: int = 2) -> tuple[float, int]:
    """Seconds to re-cluster the whole training set with the fitted model (the second pass: the first may
    compile the embedding pass's batch shapes)."""
    n = len(trainer.datamodule.train_arrays()[0])
    seconds = []
    for _ in range(repeats):
        synchronize(model.device)
        start = time.perf_counter()
        recluster.rebuild(trainer, model, k=model.K)
        synchronize(model.device)
        seconds.append(time.perf_counter() - start)
    return seconds[-1], n


def full_run(args) -> None:
    out = Path(tempfile.mkdtemp(prefix="gpu_speed_full_"))
    cmd = [sys.executable, "-m", "src.train", *loop_overrides(args, not args.no_compile), f"trainer.max_epochs={args.epochs}",
           "callbacks.rich_progress_bar=null", "+trainer.enable_progress_bar=false", f"hydra.run.dir={out}"]
    print("4. full run:", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"the full run failed (exit {proc.returncode}); its output is above")
    res = json.loads((out / "results.json").read_text())
    keep = {k: v for k, v in res.items() if k.startswith(("test/magnet", "test/knn", "test/nmi", "test/map", "val/best", "time/"))}
    print(f"4. {args.epochs} epochs: wall {wall:.0f} s incl. start-up "
          f"(target <= 180 s, goal 120 s); test magnet acc {res.get('test/magnet_acc', float('nan')):.4f}\n"
          f"   {json.dumps(keep)}", flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", nargs="+", default=["bare", "loop", "recluster", "full"],
                    choices=["bare", "loop", "recluster", "full"])
    ap.add_argument("--stems", nargs="+", default=["imagenet", "cifar"])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--md", type=lambda s: tuple(int(v) for v in s.lower().split("x")), default=(16, 32),
                    help="M x D of the magnet loop's batches, e.g. 16x32 (512 images)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--subset", type=int, default=0, help="training images (0 = full data, 49,000)")
    ap.add_argument("--embed-batch", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled measurements")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible to torch; use --device cpu for a smoke run")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, data: {'JPEG copy of CIFAR-10' if HAVE_REAL_DATA else 'synthetic'}",
          flush=True)
    figures: dict = {}
    modes = [False] if args.no_compile else [False, True]
    if "bare" in args.parts:
        for stem in args.stems:
            for compiled in modes:
                start = time.perf_counter()
                ips = bare_step(stem, device, args.batch, args.steps, compiled)
                figures[f"bare/{stem}/{'compiled' if compiled else 'eager'}"] = ips
                print(f"1. bare cross-entropy step, stem {stem}, batch {args.batch}, {'compiled' if compiled else 'eager'}: "
                      f"{ips:,.0f} img/s ({time.perf_counter() - start:.0f} s incl. warm-up and any compile)", flush=True)
    if "loop" in args.parts or "recluster" in args.parts:
        fitted = None
        for compiled in modes:
            ips, trainer, model, recluster = magnet_loop(args, compiled)
            fitted = (trainer, model, recluster)
            figures[f"loop/{'compiled' if compiled else 'eager'}"] = ips
            bare = figures.get(f"bare/{args.stems[0]}/compiled" if compiled else f"bare/{args.stems[0]}/eager")
            ratio = f" -> {ips / bare:.2f} x the {'compiled' if compiled else 'eager'} bare step" if bare else ""
            print(f"2. magnet loop through Lightning, M x D = {args.md[0]} x {args.md[1]}, "
                  f"{'compiled' if compiled else 'eager'}: {ips:,.0f} img/s{ratio} (target >= 0.8 compiled)", flush=True)
        if "recluster" in args.parts:
            seconds, n = recluster_time(*fitted)
            figures["recluster_s"] = seconds
            epoch_s = n / figures[f"loop/{'eager' if args.no_compile else 'compiled'}"]
            print(f"3. re-clustering {n:,} images: {seconds:.2f} s; an epoch at the loop's speed {epoch_s:.1f} s "
                  f"-> re-clustering {100 * seconds / (epoch_s + seconds):.0f} % of it (target <= 10 %)", flush=True)
    if "full" in args.parts:
        full_run(args)
    return figures


if __name__ == "__main__":
    main()
