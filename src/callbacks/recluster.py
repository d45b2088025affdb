"""Rebuilds the magnet cluster index from the training embeddings with FAISS k-means.

The index is rebuilt once per epoch, at the end of its training batches and before validation, from
one embedding pass (with the BatchNorm re-estimation for models trained on neighbourhood batches).
Validation and the next epoch's training use that index, and the test repeats the same procedure (same
pass, same k-means seed, final K) on the selected weights, so the checkpoint is selected on exactly the
measurement that is reported."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path

import torch
from pytorch_lightning.callbacks import Callback

from src.models.components.cluster_index import ClusterIndex, build_cluster_index
from src.models.embed import embed_images
from src.utils.distributed import gather_uneven
from src.utils.seeding import stream_seed

log = logging.getLogger(__name__)


def index_digest(index: ClusterIndex) -> str:
    h = hashlib.sha256()
    for t in (index.centroids, index.centroid_labels, index.assignments):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ReclusterCallback(Callback):
    """Every ``every_n_epochs`` epochs (from the end of the model's warm-up) and before testing: embed the
    training set, run per-class k-means, and hand the index to the model (and so to its batch sampler)."""

    builds_cluster_index = True  # what a model's check_training_plan looks for, without importing this class

    def __init__(self, every_n_epochs: int = 1, kmeans_iters: int = 20, seed: int = 0, batch_size: int = 500,
                 recalibrate_bn: bool = True, bn_pass_augment: bool = False):
        if every_n_epochs < 1:
            raise ValueError(f"callbacks.recluster.every_n_epochs must be >= 1, got {every_n_epochs}")
        if bn_pass_augment and not recalibrate_bn:
            raise ValueError("callbacks.recluster.bn_pass_augment=true augments the BatchNorm re-estimation pass, "
                             "which callbacks.recluster.recalibrate_bn=false turns off: set one of them the other way")
        self.every_n_epochs, self.kmeans_iters, self.seed = every_n_epochs, kmeans_iters, seed
        self.batch_size, self.recalibrate_bn = batch_size, recalibrate_bn
        # true: the re-estimation pass sees the training images augmented as the training steps do (when the
        # datamodule augments), so BatchNorm normalizes with the statistics of the inputs the network learnt
        # on, as softmax's running statistics do. It lifted CE-trained checkpoints by 1.1-2.9 points but tied
        # over three full magnet runs (docs/magnet_investigation.md), so clean images stay the default.
        self.bn_pass_augment = bn_pass_augment
        self.last_seconds = 0.0
        self.total_seconds = 0.0
        self._rebuilt_epoch: int | None = None  # the epoch whose end has already re-clustered

    def setup(self, trainer, pl_module, stage: str):
        # an option that could not act on this run is an error, not a silent no-op
        if not self.bn_pass_augment:
            return
        if not pl_module.uses_neighbourhood_sampler:
            raise ValueError(f"callbacks.recluster.bn_pass_augment=true: {type(pl_module).__name__} keeps its running "
                             "BatchNorm statistics, so there is no re-estimation pass to augment; set it to false")
        if not getattr(trainer.datamodule, "augment", False):
            raise ValueError("callbacks.recluster.bn_pass_augment=true needs augmented training images, but "
                             "data.augment is false: set one of them the other way")

    def _progress(self, trainer):
        """A transient rich bar for the embedding pass when the run shows a rich progress bar."""
        from pytorch_lightning.callbacks import RichProgressBar

        if trainer.is_global_zero and any(isinstance(cb, RichProgressBar) for cb in trainer.callbacks):
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            return Progress(TextColumn("re-clustering: {task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), transient=True)
        return contextlib.nullcontext()

    def due_after(self, epoch: int, pl_module) -> bool:
        """Re-cluster at the end of ``epoch``? From the last warm-up epoch on (the next epoch trains on
        the index), every ``every_n_epochs`` epochs, and always after the last epoch."""
        start = pl_module.warmup_epochs - 1
        last = epoch + 1 >= (pl_module.trainer.max_epochs or 0)
        return epoch >= start and ((epoch - start) % self.every_n_epochs == 0 or last)

    def on_train_epoch_start(self, trainer, pl_module):
        # Only the first epoch of magnet training without a warm-up has no index from an earlier end of epoch
        if pl_module.needs_index_for_training(trainer.current_epoch) and pl_module.cluster_state.index is None:
            self.rebuild(trainer, pl_module, k=pl_module.clusters_per_class(trainer.current_epoch))

    def _end_of_epoch(self, trainer, pl_module):
        epoch = trainer.current_epoch
        if not pl_module.uses_training_index or self._rebuilt_epoch == epoch or not self.due_after(epoch, pl_module):
            return
        self._rebuilt_epoch = epoch
        self.rebuild(trainer, pl_module, k=pl_module.clusters_per_class(epoch + 1))
        pl_module.index_fresh = True

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        pl_module.index_fresh = False
        # a validation in the middle of an epoch (val_check_interval < 1) keeps the epoch's index
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._end_of_epoch(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        # epochs without validation still re-cluster for the next epoch (this runs before checkpoints are
        # saved: Lightning calls ModelCheckpoint callbacks last)
        self._end_of_epoch(trainer, pl_module)
        if self._rebuilt_epoch == trainer.current_epoch:
            pl_module.log("time/recluster_s", self.last_seconds)

    def on_test_start(self, trainer, pl_module):
        # The selected checkpoint's index was built by the same pass and k-means seed at the end of its
        # epoch; repeating both on its weights reproduces the index its validation accuracy used.
        stored = pl_module.cluster_state.index
        seed = stored.seed if stored is not None else self.kmeans_seed(trainer, 0)
        self.rebuild(trainer, pl_module, k=pl_module.clusters_per_class(None), seed=seed, keep_reference=True)

    def kmeans_seed(self, trainer, epoch: int) -> int:
        increment = getattr(trainer.datamodule, "increment", None)
        return stream_seed(self.seed, "kmeans", increment, epoch) % (2**31 - 1024)  # FAISS takes a C int

    def rebuild(self, trainer, pl_module, k: int, seed: int | None = None, keep_reference: bool = False) -> ClusterIndex:
        start = time.perf_counter()
        dm = trainer.datamodule
        images, labels = dm.train_arrays()
        shard = (trainer.global_rank, trainer.world_size)
        # iid-trained models keep their running BN statistics: validation and test then measure the same thing
        recalibrate = self.recalibrate_bn and pl_module.uses_neighbourhood_sampler
        if seed is None:
            seed = self.kmeans_seed(trainer, trainer.current_epoch)
        # the augmentation draws are keyed by the k-means seed, which the index keeps: the test-time
        # rebuild from the selected weights repeats this pass exactly
        augment = recalibrate and self.bn_pass_augment and getattr(dm, "augment", False)
        with self._progress(trainer) as progress:
            emb = embed_images(pl_module, dm.transform, images, self.batch_size, recalibrate, shard, progress,
                               augment_seed=seed if augment else None)
        if trainer.world_size > 1:
            parts = gather_uneven(pl_module, emb)
            # gather_uneven concatenates rank 0's positions, then rank 1's...: restore dataset order
            order = torch.cat([torch.arange(r, len(images), trainer.world_size) for r in range(trainer.world_size)])
            emb = torch.empty_like(parts)
            emb[order.to(parts.device)] = parts
        emb = emb.cpu()
        index = None
        if trainer.is_global_zero:
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
        log.info(f"re-clustered {len(labels)} embeddings into {index.num_clusters} clusters in {self.last_seconds:.1f}s")
        return index
