"""Rebuilds the magnet cluster index from the training embeddings with FAISS k-means."""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from src.data.neighbourhood_sampler import NeighbourhoodBatchSampler
from src.models.components.cluster_index import ClusterIndex, build_cluster_index

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_images(module: pl.LightningModule, datamodule, images: torch.Tensor, batch_size: int = 500,
                 recalibrate_bn: bool = False, shard: tuple[int, int] = (0, 1), progress=None) -> torch.Tensor:
    """Embeddings of ``images`` (uint8, no augmentation) in eval mode.

    With ``recalibrate_bn`` the BatchNorm layers run in train mode with a cumulative average instead:
    the embeddings then use iid batch statistics and the running statistics are re-estimated on the
    way, in the same single pass. Neighbourhood batches hold few, similar classes, so the statistics
    BN gathered during training are biased; this undoes that before clustering and evaluation."""
    rank, world = shard
    positions = torch.arange(rank, len(images), world)
    was_training = module.training
    module.eval()
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved_momentum = [bn.momentum for bn in bns]
    if recalibrate_bn:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
    out = []
    task = progress.add_task("re-clustering: embedding", total=len(positions)) if progress is not None else None
    for start in range(0, len(positions), batch_size):
        idx = positions[start : start + batch_size]
        x = images[idx].to(module.device, non_blocking=True)
        x = datamodule.transform(x, train=False)
        out.append(module(x).float())
        if task is not None:
            progress.advance(task, len(idx))
    for bn, mom in zip(bns, saved_momentum):
        bn.momentum = mom
    module.train(was_training)
    return torch.cat(out) if out else torch.empty(0, getattr(module.net, "embedding_dim", 0), device=module.device)


def index_digest(index: ClusterIndex) -> str:
    h = hashlib.sha256()
    for t in (index.centroids, index.centroid_labels, index.assignments):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ReclusterCallback(Callback):
    """Every ``every_n_epochs`` epochs (from the model's warm-up end) and before testing: embed the
    training set, run per-class k-means, and hand the index to the model and the batch sampler."""

    def __init__(self, every_n_epochs: int = 1, kmeans_iters: int = 20, seed: int = 0, batch_size: int = 500,
                 recalibrate_bn: bool = True):
        if every_n_epochs < 1:
            raise ValueError(f"callbacks.recluster.every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs, self.kmeans_iters, self.seed = every_n_epochs, kmeans_iters, seed
        self.batch_size, self.recalibrate_bn = batch_size, recalibrate_bn
        self.last_seconds = 0.0
        self.total_seconds = 0.0

    def setup(self, trainer, pl_module, stage):
        if stage != "fit" or not getattr(pl_module, "uses_neighbourhood_sampler", False):
            return
        dm = trainer.datamodule
        pl_module.cluster_state.reset(len(dm.train_indices))

        def factory(labels, rank, world):
            return NeighbourhoodBatchSampler(pl_module.cluster_state, len(labels), pl_module.M, pl_module.D,
                                             seed=self.seed, random_clusters=pl_module.random_clusters,
                                             rank=rank, world_size=world)

        dm.train_batch_sampler_factory = factory

    def teardown(self, trainer, pl_module, stage):
        if trainer.datamodule is not None and stage == "fit":
            trainer.datamodule.train_batch_sampler_factory = None

    def _progress(self, trainer):
        """A transient rich bar for the embedding pass when the run shows a rich progress bar."""
        import contextlib

        from pytorch_lightning.callbacks import RichProgressBar

        if trainer.is_global_zero and any(isinstance(cb, RichProgressBar) for cb in trainer.callbacks):
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), transient=True)
        return contextlib.nullcontext()

    def due(self, epoch: int, pl_module) -> bool:
        start = pl_module.warmup_epochs
        return epoch >= start and (epoch - start) % self.every_n_epochs == 0

    def on_train_epoch_start(self, trainer, pl_module):
        if getattr(pl_module, "uses_training_index", False) and self.due(trainer.current_epoch, pl_module):
            self.rebuild(trainer, pl_module)

    def on_test_start(self, trainer, pl_module):
        # Test runs on the selected checkpoint's weights, so its index must come from those weights.
        self.rebuild(trainer, pl_module, keep_reference=True)

    def rebuild(self, trainer, pl_module, keep_reference: bool = False) -> ClusterIndex:
        start = time.perf_counter()
        dm = trainer.datamodule
        images, labels = dm.train_arrays()
        shard = (trainer.global_rank, trainer.world_size)
        with self._progress(trainer) as progress:
            emb = embed_images(pl_module, dm, images, self.batch_size, self.recalibrate_bn, shard, progress)
        if trainer.world_size > 1:
            from src.models.embedding_module import gather_uneven

            parts = gather_uneven(pl_module, emb)
            # gather_uneven concatenates rank 0's positions, then rank 1's...: restore dataset order
            order = torch.cat([torch.arange(r, len(images), trainer.world_size) for r in range(trainer.world_size)])
            emb = torch.empty_like(parts)
            emb[order.to(parts.device)] = parts
        emb = emb.cpu()
        index = None
        if trainer.is_global_zero:
            # Test-time indices use the bare seed, so src.eval on a checkpoint rebuilds the same index.
            seed = self.seed if keep_reference else self.seed + trainer.current_epoch
            k = pl_module.clusters_per_class(None if keep_reference else trainer.current_epoch)
            index = build_cluster_index(emb, labels, k, seed=seed, niter=self.kmeans_iters)
        if trainer.world_size > 1:
            index = trainer.strategy.broadcast(index, src=0)  # one clustering, identical on every rank
        pl_module.cluster_state.index = index
        if trainer.world_size > 1 and getattr(pl_module, "output_dir", None) is not None:
            # lets anyone (and the DDP test) check that every rank holds the same index
            digest = index_digest(index)
            path = Path(pl_module.output_dir) / f"index_digest_rank{trainer.global_rank}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(f"{trainer.current_epoch} {digest}\n")
        if keep_reference:
            pl_module.train_reference = (emb, labels.clone())
        self.last_seconds = time.perf_counter() - start
        self.total_seconds += self.last_seconds
        if trainer.training:
            pl_module.log("time/recluster_s", self.last_seconds)
        log.info(f"re-clustered {len(labels)} embeddings into {index.num_clusters} clusters in {self.last_seconds:.1f}s")
        return index
