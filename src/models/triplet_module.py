"""Triplet-loss baseline with semi-hard negative mining (pytorch-metric-learning)."""
from __future__ import annotations

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
            # optional, as magnet has (off by default: at our budget it did not stop semi-hard mining
            # from undoing the warm-up's embedding)
            return self.observe(batch, emb, self.warmup_loss(emb, y))
        loss = self.loss(emb, y, self.miner(emb, y))
        self.check_finite(loss, "triplet loss")
        self.log_train({"train/triplet": loss})
        return self.observe(batch, emb, loss)
