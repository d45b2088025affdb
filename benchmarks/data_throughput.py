"""Throughput of the training data path: index the in-memory uint8 tensors, then random-crop, flip
and normalize whole batches, exactly as training does (on CPU here).

    python benchmarks/data_throughput.py [--data-dir DIR] [--batch-size 128] [--epochs 3]
"""
from __future__ import annotations

import argparse
import time

import torch

from src.data.cifar10_datamodule import CIFAR10DataModule, default_data_dir
from src.data.fake_datamodule import FakeDataModule


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=default_data_dir())
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dm = CIFAR10DataModule(data_dir=args.data_dir, subset_size=None, val_size=0, batch_size=args.batch_size)
        dm.setup()
        source = "CIFAR-10 (50,000 training images)"
    except Exception as e:  # no built data: measure on synthetic images of the same shape
        print(f"note: {e}; measuring on synthetic data")
        dm = FakeDataModule(train_per_class=5000, test_per_class=10, val_size=0, batch_size=args.batch_size)
        dm.setup()
        source = "synthetic CIFAR-shaped data (50,000 images)"
    loader = dm.train_dataloader()
    n = 0
    start = time.perf_counter()
    for epoch in range(args.epochs):
        loader.batch_sampler.set_epoch(epoch)
        for x, _y, _idx in loader:
            out = dm.transform(x, train=True)
            n += len(out)
    seconds = time.perf_counter() - start
    print(f"data path on {source}, batch {args.batch_size}, torch threads {torch.get_num_threads()}:")
    print(f"  {n} augmented images in {seconds:.2f}s = {n / seconds:,.0f} img/s (target >= 5,000)")


if __name__ == "__main__":
    main()
