"""Cross-entropy baseline: same trunk and head; the embedding is the penultimate layer."""
from __future__ import annotations

from src.models.embedding_module import EmbeddingModule


class SoftmaxModule(EmbeddingModule):
    # continual evaluation: argmax of the classifier's logits (over the seen classes, or the increment's own)
    predicts_with_logits = True

    def classifier_logits(self, emb):
        return self.net.classifier(emb)

    def selection_start_epoch(self, max_epochs=None) -> int:
        # cross-entropy is this model's own loss from the first epoch, and it is selected on its logits, so
        # neither a warm-up nor the K schedule (which only shapes the evaluation index) delays selection
        return 0

    def primary_val_metric(self, values):
        return values["softmax_acc"]

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        emb = self.training_forward(x)
        return self.observe(batch, emb, self.classifier_loss(emb, y))
