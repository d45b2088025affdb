"""GoogLeNet trained with magnet loss on neighbourhood batches, with an optional cross-entropy warm-up."""
from __future__ import annotations

import math

import torch

from src.data.neighbourhood_sampler import NeighbourhoodBatchSampler
from src.models.components.magnet_loss import MagnetLoss
from src.models.embed import batchnorm_layers
from src.models.embedding_module import EmbeddingModule


class MagnetModule(EmbeddingModule):
    uses_training_index = True
    uses_neighbourhood_sampler = True

    def __init__(self, *args, loss: MagnetLoss, variance_momentum: float = 0.9, eval_variance_source: str = "running",
                 bn_mode: str = "batch", ce_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if bn_mode not in ("batch", "frozen"):
            raise ValueError(f"model.bn_mode must be batch or frozen, got {bn_mode!r}")
        # "frozen": after warm-up, BatchNorm normalizes with running statistics that the re-clustering
        # pass re-estimates on iid batches every epoch, instead of with the statistics of the
        # neighbourhood batch. Neighbourhood batches hold a few similar classes, so batch statistics
        # differ from test-time ones and features learnt under them do not transfer to evaluation.
        self.bn_mode = bn_mode
        if not 0 <= variance_momentum < 1:
            raise ValueError(f"model.variance_momentum must be in [0, 1), got {variance_momentum}")
        if eval_variance_source not in ("running", "index"):
            raise ValueError(f"model.eval_variance_source must be running or index, got {eval_variance_source!r}")
        if not ce_weight >= 0:
            raise ValueError(f"model.ce_weight must be >= 0, got {ce_weight}")
        # Cross-entropy through the classifier head added to the magnet loss after the warm-up (not in the
        # paper; 0 = the paper's loss). The magnet rule still classifies and selects checkpoints.
        self.ce_weight = float(ce_weight)
        self.loss = loss
        self.variance_momentum = variance_momentum
        self.eval_variance_source = eval_variance_source
        self.register_buffer("running_variance", torch.tensor(float("nan")))

    def classifier_logits(self, emb):
        # The classifier head trains during the warm-up, and afterwards only with a cross-entropy term.
        return self.net.classifier(emb) if self.cluster_state.index is None or self.ce_weight > 0 else None

    def eval_variance(self) -> float:
        rv = float(self.running_variance)
        if self.eval_variance_source == "running" and math.isfinite(rv) and rv > 0:
            return rv
        return super().eval_variance()

    def train_batch_sampler(self, num_examples, seed, increment, rank, world_size):
        return NeighbourhoodBatchSampler(self.cluster_state, num_examples, self.M, self.D, seed=seed,
                                         random_clusters=self.random_clusters, rank=rank, world_size=world_size,
                                         increment=increment, seed_weight=self.seed_weight,
                                         quota_power=self.quota_power, warmup_batches=self.warmup_batches)

    def on_train_batch_start(self, batch, batch_idx):
        if self.bn_mode == "frozen" and not self.in_warmup():
            for m in batchnorm_layers(self):
                m.eval()

    def training_step(self, batch, batch_idx):
        x, y, pos = batch
        emb = self.training_forward(x)
        if self.in_warmup():
            return self.observe(batch, emb, self.classifier_loss(emb, y))
        # cluster ids gathered on the device: the step never asks the host for anything
        assignments, cluster_labels = self.cluster_state.index_on(emb.device)
        impostors = None if self.strategy is None else self.strategy.impostor_mask(y)
        loss, per_example, variance, lacking = self.loss.indexed(emb.float(), assignments[pos], y, cluster_labels,
                                                                 impostor_classes=impostors)  # fp32
        self.check_finite(loss, "magnet loss")
        self.check_impostors(lacking)
        self.cluster_state.record_losses(pos, per_example)
        self.update_running_variance(variance)
        self.log_train({"train/magnet": loss, "train/sigma2": variance})
        if self.ce_weight > 0:  # a config constant, not a value on the device: no host sync
            loss = loss + self.ce_weight * self.classifier_loss(emb, y)
        return self.observe(batch, emb, loss)

    @torch.no_grad()
    def update_running_variance(self, variance: torch.Tensor) -> None:
        v = variance.detach().clone().float()  # all_reduce works in place: never on the graph's tensor
        if self._trainer is not None and self.trainer.world_size > 1:
            v = self.trainer.strategy.reduce(v, reduce_op="mean")
        # first batch: take it; then the moving average (a device-side choice, no host branch)
        averaged = self.running_variance * self.variance_momentum + (1 - self.variance_momentum) * v
        self.running_variance.copy_(torch.where(torch.isnan(self.running_variance), v, averaged))
