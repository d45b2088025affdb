"""How much does the magnet rule's read-out matter? Re-measures a checkpoint's magnet accuracy on the validation
split (by default; never choose on test) under other read-outs: L (how many nearest clusters the rule sums over)
and the variance it divides by (the model's own, i.e. by default the running average of the per-batch sigma^2, the
variance of the rebuilt index, or a multiple of the model's own).

    python -m src.models.readout_choice outputs/.../checkpoints/epoch_046.ckpt [--split val] [--data-dir data]

The index is rebuilt from the checkpoint's weights exactly as ``python -m src.eval`` does (same pass, same
k-means seed), so the first row reproduces the ``val/acc`` the checkpoint was selected on; that pass's embeddings
then serve every read-out."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from src.eval import checkpoint_for_testing, load_run_config
from src.models.components.magnet_loss import magnet_predict

READOUT_L = (1, 2, 4, 8)
VARIANCE_SCALES = (0.5, 2.0)


def readout_choices(ckpt_path: Path, split: str = "val", data_dir: str | None = None) -> dict[str, float]:
    """Magnet accuracy of the checkpoint on ``split`` under each read-out, the model's own first."""
    checkpoint, run_cfg = load_run_config(Path(ckpt_path))
    if "state_dict" not in checkpoint:
        raise ValueError(f"{ckpt_path} is a continual run's state; readout_choice takes a checkpoints/*.ckpt of a "
                         "metric-learning run (for continual centroids: python -m src.continual.centroid_choice)")
    with open_dict(run_cfg):
        run_cfg.model.evaluation.tsne = False
        if data_dir is not None:
            run_cfg.data.data_dir = data_dir
    model, datamodule, callbacks = checkpoint_for_testing(checkpoint, run_cfg, split)
    if not hasattr(model, "running_variance"):
        raise ValueError(f"{ckpt_path} is a {type(model).__name__} checkpoint; the read-out choices are those of "
                         "a magnet model (model=magnet)")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    # the test-time procedure: rebuilds the index (and re-estimates BatchNorm) from the checkpoint's weights, then
    # embeds the split, whose embeddings every read-out below reuses
    trainer.test(model, datamodule=datamodule, verbose=False)
    if model.test_embeddings is None:
        raise ValueError(f"the {split} split of {ckpt_path}'s run has no images (data.val_size=0?); choose --split test "
                         "or a run with a validation split")
    emb, labels = model.test_embeddings
    index = model.cluster_state.index
    return readout_accuracies(emb, labels, index.centroids, index.centroid_labels, model.num_classes,
                              own=(f"own (sigma^2 {model.eval_variance_source}, L={model.L})", model.eval_variance(), model.L),
                              index_variance=index.variance)


def readout_accuracies(emb: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, centroid_labels: torch.Tensor,
                       num_classes: int, own: tuple[str, float, int], index_variance: float) -> dict[str, float]:
    """Accuracy of the magnet rule on ``emb`` for the model's own (name, variance, L), then each alternative."""
    name, variance, L_own = own

    def accuracy(var: float, L: int) -> float:
        probs = magnet_predict(emb, centroids, centroid_labels, var, num_classes, L)
        return float((probs.argmax(1) == labels).float().mean())

    out = {name: accuracy(variance, L_own), "sigma^2 of the rebuilt index": accuracy(index_variance, L_own)}
    out.update({f"L={L}": accuracy(variance, L) for L in READOUT_L})
    out.update({f"own sigma^2 x {s:g}": accuracy(variance * s, L_own) for s in VARIANCE_SCALES})
    return out


def main(argv=None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt_path", type=Path)
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--data-dir", default=None, help="the data folder, if not the one stored in the checkpoint")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results = readout_choices(args.ckpt_path, args.split, args.data_dir)
    for name, acc in results.items():
        print(f"{name:40s} {100 * acc:6.2f} %")
    return results


if __name__ == "__main__":
    main()
