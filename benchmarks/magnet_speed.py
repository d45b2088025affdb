"""Magnet-loss speed, measured in one run on this machine:

1. training throughput (img/s) of magnet loss on neighbourhood batches, as a ratio to plain
   cross-entropy training of the same backbone and batch size;
2. re-clustering time as a ratio to a bare forward pass over the same images, and its share of
   the epoch time;
3. FAISS k-means against scikit-learn KMeans on the same embeddings.

    python benchmarks/magnet_speed.py [--steps 40] [--subset 5000]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from src.callbacks.recluster import ReclusterCallback
from src.data.cifar10_datamodule import default_data_dir
from src.models.components.cluster_index import build_cluster_index, kmeans_assign
from src.models.embed import embed_images
from src.utils.compose import compose

HAVE_REAL_DATA = (Path(default_data_dir()) / "cifar-10-batches-py" / "test_batch").is_file()


class StepTimer(Callback):
    """Wall time of training steps after ``skip`` warm-up steps (allocator, first-call overheads, compilation).

    ``sync`` drains the device (e.g. ``torch.cuda.synchronize``) where the clock starts and at step ``last``, so an
    accelerator's queued work is counted; the CPU needs none, and then every step end updates the time."""

    def __init__(self, skip: int = 5, last: int | None = None, sync=lambda: None):
        self.skip, self.last, self.sync = skip, last, sync
        self.start, self.images, self.seconds = None, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.skip:
            self.sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.skip and (self.last is None or batch_idx <= self.last):
            self.images += len(batch[1])
            if self.last is None or batch_idx == self.last:
                self.sync()
                self.seconds = time.perf_counter() - self.start


def setup(experiment: str, args, tmp: str, extra=()):
    data = [] if HAVE_REAL_DATA else ["data=fake", "data.train_per_class=600", "data.subset_size=null"]
    cfg = compose([f"experiment={experiment}", *data, f"data.subset_size={args.subset}" if HAVE_REAL_DATA else "seed=0",
                   "model.warmup_epochs=0", "model.warmup_fraction=null", "model.evaluation.tsne=false", *extra], tmp)
    dm = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    return cfg, dm, model


def throughput(experiment: str, args, extra=()) -> tuple[float, ReclusterCallback, pl.LightningModule, object]:
    import tempfile

    cfg, dm, model = setup(experiment, args, tempfile.mkdtemp(), extra)
    timer, recluster = StepTimer(), ReclusterCallback(seed=0)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=args.steps + timer.skip, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer, recluster], accelerator="cpu")
    trainer.fit(model, datamodule=dm)
    return timer.images / timer.seconds, recluster, model, dm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--subset", type=int, default=5000)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"data: {'JPEG copy of CIFAR-10' if HAVE_REAL_DATA else 'synthetic (CIFAR-10 not built)'}, "
          f"torch threads {torch.get_num_threads()}")
    bs = ["model.clusters.K=8", "model.clusters.split_fraction=null", "model.clusters.M=8", "model.clusters.D=8"]
    ce_ips, _, _, _ = throughput("softmax_cifar10", args, ["data.batch_size=64"])
    mg_ips, recluster, model, dm = throughput("magnet_cifar10", args, bs)
    print(f"1. training throughput, batch 64 (magnet: K=8, M=8, D=8): cross-entropy {ce_ips:.0f} img/s, magnet {mg_ips:.0f} img/s "
          f"-> ratio {mg_ips / ce_ips:.2f} (target >= 0.85)")

    images, labels = dm.train_arrays()
    start = time.perf_counter()
    emb = embed_images(model, dm.transform, images, batch_size=500)
    forward_s = time.perf_counter() - start

    class _T:  # the callback only needs these trainer attributes outside a fit
        datamodule, global_rank, world_size, is_global_zero, current_epoch, training, callbacks = dm, 0, 1, True, 1, False, []

    start = time.perf_counter()
    recluster.rebuild(_T, model, k=8)
    recluster_s = time.perf_counter() - start
    epoch_train_s = len(images) / mg_ips
    print(f"2. re-clustering {len(images)} images: {recluster_s:.2f}s vs bare forward {forward_s:.2f}s "
          f"-> ratio {recluster_s / forward_s:.2f} (target <= 1.25); share of a magnet epoch "
          f"({epoch_train_s:.1f}s training + re-clustering): {100 * recluster_s / (epoch_train_s + recluster_s):.0f}%")

    emb_np = emb.cpu().numpy().astype(np.float32)
    lab = labels.numpy()
    start = time.perf_counter()
    build_cluster_index(emb.cpu(), labels, k=8, seed=0, niter=20)
    faiss_s = time.perf_counter() - start
    from sklearn.cluster import KMeans

    start = time.perf_counter()
    for c in np.unique(lab):
        KMeans(n_clusters=8, n_init=1, max_iter=20, random_state=0).fit(emb_np[lab == c])
    sk_s = time.perf_counter() - start
    start = time.perf_counter()
    for c in np.unique(lab):
        kmeans_assign(emb_np[lab == c], 8, 0, 20)
    faiss_only_s = time.perf_counter() - start
    print(f"3. per-class k-means (K=8, 20 iterations) on {len(lab)} embeddings: FAISS {faiss_only_s:.3f}s "
          f"(whole index incl. centroid ranking {faiss_s:.3f}s), scikit-learn {sk_s:.3f}s "
          f"-> FAISS {sk_s / faiss_only_s:.1f}x faster")


if __name__ == "__main__":
    main()
