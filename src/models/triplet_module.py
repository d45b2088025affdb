"""Triplet-loss baseline with semi-hard negative mining (pytorch-metric-learning)."""
from __future__ import annotations

import torch.nn.functional as F
from pytorch_metric_learning import losses, miners

from src.models.embedding_module import EmbeddingModule


class TripletModule(EmbeddingModule):
    uses_training_index = True  # validation accuracy uses the magnet rule on a per-epoch index

    def __init__(self, *args, margin: float = 0.2, **kwargs):
        super().__init__(*args, **kwargs)
        if margin <= 0:
            raise ValueError(f"model.margin must be > 0, got {margin}")
        self.miner = miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")
        self.loss = losses.TripletMarginLoss(margin=margin)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        emb = self(x)
        if self.current_epoch < self.warmup_epochs:
            # optional cross-entropy warm-up, as magnet has (off by default: at our budget it did not
            # stop semi-hard mining from undoing the warm-up's embedding)
            loss = F.cross_entropy(self.net.classifier(emb), y)
            self.check_finite(loss, "cross-entropy warm-up loss")
            self.log("train/ce", loss, prog_bar=True)
            return loss
        loss = self.loss(emb, y, self.miner(emb, y))
        self.check_finite(loss, "triplet loss")
        self.log("train/triplet", loss, prog_bar=True)
        return loss
