"""Which centroids should classify the old classes? Re-measures a finished continual run's Class-IL on the
validation split (never on test) with several centroid choices, from its saved continual_state.pt.

    python -m src.continual.centroid_choice outputs/.../continual_5x2/<time>/continual_state.pt

Choices: the run's own strategy; fresh (the current index: exemplar clusters for old classes); stored (the
centroids kept at the end of each class's increment, drift-compensated where the strategy does); exemplar
means (one centroid per old class: the mean embedding of its exemplars; fresh for the newest classes)."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch

from src.continual.runner import cil_til_accuracies, load_state, seen_accuracy
from src.eval import load_run_config
from src.models.embed import embed_images


def centroid_choices(strategy, module, datamodule, newest: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    index = module.cluster_state.index
    seen = datamodule.seen_classes

    def assemble(pick) -> tuple[torch.Tensor, torch.Tensor]:
        cents = [pick(c) for c in seen]
        labels = [torch.full((len(x),), c, dtype=torch.long) for c, x in zip(seen, cents)]
        return torch.cat(cents), torch.cat(labels)

    def fresh(c):
        return index.centroids[index.centroid_labels == c]

    choices = {"strategy's own": strategy.eval_centroids(seen, module), "fresh (current index)": assemble(fresh)}
    stored = getattr(strategy, "stored_centroids", {})
    if all(c in stored for c in seen):
        choices["stored at the end of each class's increment"] = assemble(lambda c: stored[c])
    memory = getattr(strategy, "memory", {})
    if all(c in memory for c in seen if c not in newest):
        def exemplar_mean(c):
            if c in newest:
                return fresh(c)
            return embed_images(module, datamodule.transform, datamodule.pool_arrays(memory[c])[0]).cpu().mean(0, keepdim=True)

        choices["exemplar means (old), fresh (newest)"] = assemble(exemplar_mean)
    return choices


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m src.continual.centroid_choice RUN_DIR/continual_state.pt")
    state, cfg = load_run_config(Path(argv[0]))
    if "completed" not in state:
        raise SystemExit(f"{argv[0]} is not a continual_state.pt")
    datamodule, module, strategy = (hydra.utils.instantiate(c) for c in (cfg.data, cfg.model, cfg.strategy))
    datamodule.setup()
    load_state(state, module, strategy)
    t = state["completed"]
    datamodule.increment = t
    images, labels = datamodule.val_arrays(datamodule.seen_classes)
    emb = embed_images(module, datamodule.transform, images).cpu()
    increments = [datamodule.classes_of_increment(j) for j in range(t + 1)]
    out = {}
    print(f"| centroids | validation Class-IL after increment {t + 1} (%) | per increment (%) |\n|---|---|---|")
    for name, (cents, cent_labels) in centroid_choices(strategy, module, datamodule, increments[-1]).items():
        cil, _ = cil_til_accuracies(emb, labels, cents, cent_labels, module.eval_variance(), increments,
                                    module.num_classes, module.L)
        out[name] = seen_accuracy(cil, labels, datamodule, t)
        print(f"| {name} | {100 * out[name]:.1f} | {' / '.join(f'{100 * a:.0f}' for a in cil)} |")
    return out


if __name__ == "__main__":
    main()
