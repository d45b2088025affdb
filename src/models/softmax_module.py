"""Cross-entropy baseline: same trunk and head; the embedding is the penultimate layer."""
from __future__ import annotations

from src.models.embedding_module import EmbeddingModule

READOUTS = ("head", "ncm")


class SoftmaxModule(EmbeddingModule):
    # continual evaluation: argmax of the classifier's logits (over the seen classes, or the increment's own)
    predicts_with_logits = True

    def __init__(self, *args, readout: str = "head", **kwargs):
        super().__init__(*args, **kwargs)
        if readout not in READOUTS:
            raise ValueError(f"model.readout must be one of {', '.join(READOUTS)} (head: argmax of the classifier's logits; "
                             f"ncm: nearest class mean of the embedding), got {readout!r}")
        # the continual read-out: ncm measures the nearest class mean of the L2-normalised embedding first and the
        # head's argmax beside it (src/continual/runner.py); head measures the head alone
        self.readout = readout

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
