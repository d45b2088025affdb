"""Triplet-loss baseline with semi-hard negative mining (all semi-hard triplets of the batch, static shapes:
src/models/components/triplet_loss.py, equal to pytorch-metric-learning's miner + loss)."""
from __future__ import annotations

from src.models.components.triplet_loss import semihard_triplet_loss
from src.models.embedding_module import EmbeddingModule


class TripletModule(EmbeddingModule):
    uses_training_index = True  # validation accuracy uses the magnet rule on a per-epoch index

    def __init__(self, *args, margin: float = 0.2, **kwargs):
        super().__init__(*args, **kwargs)
        if margin <= 0:
            raise ValueError(f"model.margin must be > 0, got {margin}")
        self.margin = float(margin)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        emb = self.training_forward(x)
        if self.in_warmup():
            # optional, as magnet has (off by default: at our budget it did not stop semi-hard mining
            # from undoing the warm-up's embedding)
            return self.observe(batch, emb, self.classifier_loss(emb, y))
        loss = semihard_triplet_loss(emb, y, self.margin)
        self.check_finite(loss, "triplet loss")
        self.log_train({"train/triplet": loss})
        return self.observe(batch, emb, loss)
