"""The class-incremental sequence: train increment after increment, evaluate every seen increment
(Class-IL and Task-IL) after each, and resume after the last completed increment."""
from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from src.callbacks.recluster import ReclusterCallback
from src.data.cifar10 import CLASSES
from src.models.components.magnet_loss import magnet_predict
from src.models.embed import embed_images
from src.utils import cl_metrics
from src.utils import metrics as M
from src.utils.instantiate import apply_accelerator_defaults, instantiate_group, to_container
from src.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def cil_til_accuracies(emb, labels, centroids, centroid_labels, variance: float, increments: list[list[int]],
                       num_classes: int, L: int) -> tuple[list[float], list[float]]:
    """For each increment's test images: Class-IL accuracy (magnet rule over every given centroid, i.e.
    all seen classes) and Task-IL accuracy (only the centroids of that increment's own classes)."""
    cil, til = [], []
    for classes in increments:
        rows = torch.isin(labels, torch.tensor(classes))
        probs = magnet_predict(emb[rows], centroids, centroid_labels, variance, num_classes, L)
        cil.append(float((probs.argmax(1) == labels[rows]).float().mean()))
        own = torch.isin(centroid_labels, torch.tensor(classes))
        probs_own = magnet_predict(emb[rows], centroids[own], centroid_labels[own], variance, num_classes, L)
        til.append(float((probs_own.argmax(1) == labels[rows]).float().mean()))
    return cil, til


def logit_cil_til_accuracies(logits: torch.Tensor, labels: torch.Tensor, seen_classes: list[int],
                             increments: list[list[int]]) -> tuple[list[float], list[float]]:
    """For each increment's test images: Class-IL accuracy (argmax of the logits of every seen class) and
    Task-IL accuracy (argmax over the increment's own classes). Unseen classes never compete."""
    cil, til = [], []
    for classes in increments:
        rows = torch.isin(labels, torch.tensor(classes))
        for allowed, out in ((seen_classes, cil), (classes, til)):
            allowed = torch.tensor(sorted(allowed))
            pred = allowed[logits[rows][:, allowed].argmax(1)]
            out.append(float((pred == labels[rows]).float().mean()))
    return cil, til


def readouts(module, strategy) -> list[str]:
    """The read-outs a continual run measures, the primary one (what results.json's matrices, the table and any choice on
    validation use) first. A magnet model: the magnet rule on the strategy's centroids. A softmax model: the head's argmax
    over the seen classes' logits; with model.readout=ncm, or a strategy read out by class means (iCaRL), the nearest
    class mean first and the head beside it."""
    if not module.predicts_with_logits:
        return ["magnet"]
    if getattr(module, "readout", "head") == "ncm" or strategy.readout == "ncm":
        return ["ncm", "head"]
    return ["head"]


def check_readout(module, strategy) -> None:
    """One line, before any training, for a nearest-class-mean read-out the strategy has no images for."""
    if "ncm" in readouts(module, strategy) and not strategy.keeps_class_mean_images:
        raise ValueError(f"model.readout=ncm computes class means from the images a strategy keeps, and strategy="
                         f"{strategy.name} keeps none of the old classes (buffer_size 0 or no memory); use a strategy with a "
                         "memory (replay, distill with buffer_size > 0, der, icarl) or joint, or model.readout=head")


def ncm_class_means(module, datamodule, strategy) -> torch.Tensor:
    """[C, E] iCaRL's class means (CPU): each class's mean L2-normalised embedding over the images the strategy keeps
    (the memory's exemplars; joint: every seen training image), normalised again; NaN rows for classes without one."""
    kept = strategy.class_mean_images(datamodule)
    if kept is None:
        raise ValueError(f"strategy={strategy.name} holds no images to compute the nearest-class-mean read-out from")
    images, labels = kept
    emb = F.normalize(embed_images(module, datamodule.transform, images).float().cpu(), dim=1)
    return F.normalize(M.class_means(emb, labels.cpu(), module.num_classes), dim=1)


def class_il_task_il(module, datamodule, strategy, t: int, images: torch.Tensor, labels: torch.Tensor,
                     means: torch.Tensor | None = None) -> dict[str, tuple[list[float], list[float]]]:
    """Class-IL and Task-IL accuracy of each increment 0..t on ``images`` (test or validation images of every seen
    class), per read-out (``readouts``), from one embedding pass: a softmax model's head (argmax of the logits) and,
    given class ``means``, the nearest of them to the L2-normalised embedding; a magnet model's magnet rule on the
    centroids the strategy chooses."""
    emb = embed_images(module, datamodule.transform, images)
    increments = [datamodule.classes_of_increment(j) for j in range(t + 1)]
    if module.predicts_with_logits:
        with torch.no_grad():
            logits = module.classifier_logits(emb).float().cpu()
        out = {"head": logit_cil_til_accuracies(logits, labels, datamodule.seen_classes, increments)}
        if means is not None:
            scores = M.nearest_mean_scores(F.normalize(emb.float().cpu(), dim=1), means)
            out["ncm"] = logit_cil_til_accuracies(scores, labels, datamodule.seen_classes, increments)
        return out
    emb = emb.cpu()
    centroids, centroid_labels = strategy.eval_centroids(datamodule.seen_classes, module)
    return {"magnet": cil_til_accuracies(emb, labels, centroids, centroid_labels, module.eval_variance(), increments,
                                         module.num_classes, module.L)}


def evaluate_readouts(module, datamodule, strategy, t: int) -> dict[str, dict[str, list[float]]]:
    """Per read-out, row t of the four accuracy matrices: Class-IL and Task-IL on the test set and on the validation
    split of every class seen so far (training images outside the subset, never trained on)."""
    datamodule.increment = t
    names = readouts(module, strategy)
    means = ncm_class_means(module, datamodule, strategy) if "ncm" in names else None
    test = class_il_task_il(module, datamodule, strategy, t, *datamodule.test_arrays(), means=means)
    val = class_il_task_il(module, datamodule, strategy, t, *datamodule.val_arrays(datamodule.seen_classes), means=means)
    return {name: {"cil": test[name][0], "til": test[name][1], "cil_val": val[name][0], "til_val": val[name][1]}
            for name in names}


def evaluate_increment(module, datamodule, strategy, t: int) -> dict[str, list[float]]:
    """Row t of the primary read-out's four accuracy matrices (``evaluate_readouts``)."""
    rows = evaluate_readouts(module, datamodule, strategy, t)
    return rows[readouts(module, strategy)[0]]


def seen_accuracy(per_increment: list[float], labels: torch.Tensor, datamodule, t: int) -> float:
    """Accuracy over all seen classes: the per-increment accuracies weighted by their image counts."""
    weights = [int(torch.isin(labels, torch.tensor(datamodule.classes_of_increment(j))).sum()) for j in range(t + 1)]
    return float(np.average(per_increment, weights=weights))


def recluster_callback(trainer) -> ReclusterCallback:
    found = [cb for cb in trainer.callbacks if isinstance(cb, ReclusterCallback)]
    if not found:
        raise ValueError("the continual runner needs the re-clustering callback for its cluster index; add "
                         "callbacks.recluster (conf/callbacks/recluster.yaml) to the run's callbacks")
    return found[0]


def summary(R: np.ndarray) -> dict[str, float]:
    return {
        "average_accuracy": cl_metrics.average_accuracy(R),
        "average_incremental_accuracy": cl_metrics.average_incremental_accuracy(R),
        "forgetting": cl_metrics.forgetting(R),
        "backward_transfer": cl_metrics.backward_transfer(R),
    }


def later_warmup_epochs(cfg: DictConfig) -> int:
    """Cross-entropy warm-up epochs at the start of every increment after the first (model.warmup_epochs is
    the first increment's). The head and the trunk train on iid batches of the increment's images (and the
    memory, where the strategy keeps one) before the magnet loss takes over; 0 = magnet loss from the first step."""
    epochs = cfg.get("continual", {}).get("later_warmup_epochs", 0)
    max_epochs = cfg.trainer.get("max_epochs")
    if not isinstance(epochs, int) or epochs < 0 or (max_epochs is not None and epochs >= max_epochs):
        raise ValueError(f"continual.later_warmup_epochs must be an integer in [0, trainer.max_epochs={max_epochs}) so "
                         f"that later increments train at least one epoch with the method's own loss; got {epochs!r}")
    return epochs


def later_lr_scale(cfg: DictConfig) -> float:
    """The factor on the learning rate in every increment after the first (1 = the first increment's schedule
    again). A smaller step moves the embedding the earlier classes were learnt in less, at some cost to the
    new classes."""
    scale = cfg.get("continual", {}).get("later_lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"continual.later_lr_scale must be a number > 0 (1.0: every increment uses model.optimizer's "
                         f"rate); got {scale!r}")
    return float(scale)


def balanced_phase(cfg: DictConfig) -> tuple[int, float]:
    """(epochs, learning-rate factor) of the class-balanced phase that closes every increment after the first
    (continual.balanced_epochs, continual.balanced_lr_scale; EEIL's balanced fine-tuning, Castro et al. 2018). Its
    epochs come out of trainer.max_epochs, so an increment never trains longer than joint's: the increment's stream
    for max_epochs - balanced_epochs epochs, then the strategy's balanced set (as many exemplars of every seen class,
    new classes included) for balanced_epochs. 0: off."""
    conf = cfg.get("continual", {})
    epochs, scale = conf.get("balanced_epochs", 0), conf.get("balanced_lr_scale", 0.1)
    max_epochs = cfg.trainer.get("max_epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0 or (
            epochs and (max_epochs is None or epochs >= max_epochs)):
        raise ValueError(f"continual.balanced_epochs must be an integer in [0, trainer.max_epochs={max_epochs}), the "
                         f"epochs of each later increment trained on a class-balanced set; got {epochs!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"continual.balanced_lr_scale must be a number > 0 (the balanced phase's learning rate, "
                         f"times the increment's); got {scale!r}")
    return epochs, float(scale)


def save_state(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


# the four accuracy matrices and their names in results.json / accuracy_matrix.csv
MATRIX_KEYS = {"cil": "class_il", "til": "task_il", "cil_val": "class_il_val", "til_val": "task_il_val"}


def run_continual(cfg: DictConfig) -> dict:
    apply_accelerator_defaults(cfg.trainer, cfg.model)
    out = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.model)
    module.output_dir, module.run_config = out, to_container(cfg)
    strategy = hydra.utils.instantiate(cfg.strategy)
    module.strategy = strategy
    datamodule.setup()
    T = datamodule.num_increments
    names = readouts(module, strategy)
    check_readout(module, strategy)  # before any training
    # the primary read-out's matrices under their plain names (as before read-outs existed), every other one's under
    # "<read-out>:<name>", with its seen-class accuracies in seen_other
    R = {name: np.full((T, T), np.nan) for name in MATRIX_KEYS}
    R.update({f"{r}:{name}": np.full((T, T), np.nan) for r in names[1:] for name in MATRIX_KEYS})
    seen_other = {r: {"test": [], "val": []} for r in names[1:]}
    seen_acc, seen_acc_val, times, start_t = [], [], [], 0
    warmup, later_warmup = module.warmup_epochs_for(cfg.trainer.max_epochs), later_warmup_epochs(cfg)
    later_scale = later_lr_scale(cfg)
    balanced_epochs, balanced_scale = balanced_phase(cfg)
    if balanced_epochs:
        strategy.check_balanced_set()  # before any training: a strategy without a memory has no balanced set
    state_path = out / "continual_state.pt"
    if cfg.get("ckpt_path"):
        state_path = Path(cfg.ckpt_path)
    if state_path.is_file() and cfg.get("resume", True):
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        load_state(state, module, strategy)
        R, seen_acc, seen_acc_val, times = state["R"], state["seen_acc"], state["seen_acc_val"], state["times"]
        seen_other = state.get("seen_other", seen_other)
        start_t = state["completed"] + 1
        log.info(f"resuming the sequence after increment {state['completed']} from {state_path}")
    loggers = instantiate_group(cfg.get("logger"))
    t0 = time.perf_counter()
    for t in range(start_t, T):
        inc_start = time.perf_counter()
        pl.seed_everything(cfg.seed + t, workers=True)  # per increment, so a resumed run repeats it exactly
        datamodule.increment = t
        module.warmup_epochs = warmup if t == 0 else later_warmup
        module.lr_scale = 1.0 if t == 0 else later_scale
        strategy.begin_task(t, module, datamodule)
        balanced = balanced_epochs if t > 0 else 0  # the first increment is balanced already
        trainer = make_trainer(cfg, cfg.trainer.max_epochs - balanced if balanced else None)
        recluster = recluster_callback(trainer)
        log.info(f"increment {t}: classes {datamodule.increment_classes}, {len(datamodule.train_indices)} training images")
        trainer.fit(module, datamodule=datamodule)
        # Lightning hands the model back on the CPU after fit; the passes below belong on the device
        module.to(trainer.strategy.root_device)
        if balanced:
            train_balanced(cfg, module, datamodule, strategy, t, balanced, later_scale * balanced_scale)
        weights_changed = strategy.after_training(t, module) or bool(balanced)
        if weights_changed or not module.uses_training_index:
            # iid-trained models keep no index while training, and changed weights need a new one (with BatchNorm
            # re-estimated on them): one from the final weights
            recluster.rebuild(trainer, module, k=module.clusters_per_class(None))
        # (otherwise a magnet model's index was rebuilt from its final weights at the end of its last epoch)
        strategy.end_task(t, module, datamodule)
        rows = evaluate_readouts(module, datamodule, strategy, t)
        row = rows[names[0]]
        test_labels, val_labels = datamodule.test_arrays()[1], datamodule.val_arrays(datamodule.seen_classes)[1]
        for r in names:
            for name in MATRIX_KEYS:
                R[name if r == names[0] else f"{r}:{name}"][t, : t + 1] = rows[r][name]
        for r in names[1:]:
            seen_other[r]["test"].append(seen_accuracy(rows[r]["cil"], test_labels, datamodule, t))
            seen_other[r]["val"].append(seen_accuracy(rows[r]["cil_val"], val_labels, datamodule, t))
        seen_acc.append(seen_accuracy(row["cil"], test_labels, datamodule, t))
        seen_acc_val.append(seen_accuracy(row["cil_val"], val_labels, datamodule, t))
        times.append(time.perf_counter() - inc_start)
        log.info(f"increment {t}: Class-IL accuracy on seen classes {100 * seen_acc[-1]:.2f}% test, "
                 f"{100 * seen_acc_val[-1]:.2f}% validation (per increment {[round(100 * a, 1) for a in row['cil']]}), "
                 f"{times[-1]:.0f}s" + "".join(f"; {r} read-out {100 * seen_other[r]['test'][-1]:.2f}% test"
                                               for r in names[1:]))
        for lg in loggers:
            lg.log_metrics({"cl/acc_seen": seen_acc[-1], "cl/acc_seen_val": seen_acc_val[-1],
                            "cl/task_il_mean": float(np.mean(row["til"]))}, step=t)
        if trainer.is_global_zero:
            save_state(state_path, {"completed": t, "config": to_container(cfg), "model": module.state_dict(),
                                    "cluster_state": module.cluster_state.state_dict(),
                                    "strategy": strategy.state_dict(), "R": R, "seen_acc": seen_acc,
                                    "seen_acc_val": seen_acc_val, "seen_other": seen_other, "times": times})
    # a strategy measured by another read-out than its own is another row of src.compare's table
    label = strategy.label if names[0] != "ncm" or strategy.readout == "ncm" else f"{strategy.label} (NCM read-out)"
    return write_outputs(cfg, out, datamodule, R, seen_acc, seen_acc_val, times, time.perf_counter() - t0, loggers,
                         label, names, seen_other)


def make_trainer(cfg: DictConfig, max_epochs: int | None = None) -> pl.Trainer:
    """A fresh trainer for one phase of an increment: the run's callbacks (no checkpoints: the sequence saves its own
    state), no per-phase logger; ``max_epochs`` replaces trainer.max_epochs when given."""
    callbacks = [cb for cb in instantiate_group(cfg.get("callbacks")) if not isinstance(cb, pl.callbacks.ModelCheckpoint)]
    extra = {} if max_epochs is None else {"max_epochs": max_epochs}
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=False, enable_checkpointing=False, **extra)


def train_balanced(cfg: DictConfig, module, datamodule, strategy, t: int, epochs: int, lr_scale: float) -> None:
    """The class-balanced phase of increment t: ``epochs`` epochs on the strategy's balanced set at ``lr_scale`` times
    the schedule's rates (the fit re-clusters that set). With as many images of each seen class, the new classes no
    longer outnumber the old ones ~8 to 1, so the last steps do not pull the old classes' images towards them."""
    indices = strategy.balanced_set(t, module, datamodule)
    scale, datamodule.only_indices, module.lr_scale = module.lr_scale, indices, lr_scale
    try:
        trainer = make_trainer(cfg, epochs)
        log.info(f"increment {t}: balanced phase, {len(indices)} images ({len(indices) // len(datamodule.seen_classes)} "
                 f"per seen class), {epochs} epochs at {lr_scale:g} x the learning rate")
        trainer.fit(module, datamodule=datamodule)
    finally:
        datamodule.only_indices, module.lr_scale = None, scale
    module.to(trainer.strategy.root_device)


def load_state(state: dict, module, strategy) -> None:
    module.load_state_dict(state["model"])
    module.cluster_state.load_state_dict(state["cluster_state"])
    strategy.load_state_dict(state["strategy"])


def write_outputs(cfg, out: Path, datamodule, R: dict, seen_acc, seen_acc_val, times, wall, loggers,
                  label: str, names: list[str] | None = None, seen_other: dict | None = None) -> dict:
    from src.utils.plots import accuracy_curve, accuracy_heatmap

    T = len(R["cil"])
    table = [{"increment": t + 1, "classes": "-".join(CLASSES[c] for c in datamodule.classes_of_increment(t)),
              "class_ids": datamodule.classes_of_increment(t), "accuracy_seen": seen_acc[t],
              "accuracy_seen_val": seen_acc_val[t]} for t in range(T)]
    results = {
        "task": cfg.get("task_name"), "experiment": cfg.get("experiment_name"), "strategy": cfg.strategy.get("_target_"),
        "strategy_label": label,
        "seed": cfg.seed,
        # *_val: the same measurements on the validation split, what any continual setting is chosen on
        **{key: {"R": R[name], **summary(R[name])} for name, key in MATRIX_KEYS.items()},
        "table": table,
        "final_class_il_accuracy": seen_acc[-1],
        "final_class_il_accuracy_val": seen_acc_val[-1],
        # the read-out the matrices above are measured with, and every read-out's own (the primary one's repeated)
        "readout": (names or ["?"])[0],
        "readouts": readout_results(R, seen_acc, seen_acc_val, names or [], seen_other or {}),
        "time/increments_s": times, "time/total_s": float(sum(times)), "time/this_process_s": wall,
        "output_dir": str(out),
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "accuracy_matrix.csv", accuracy_matrix_csv(R))
    curve = accuracy_curve({label: seen_acc}, out / "accuracy_curve.png")
    heat = accuracy_heatmap(R["cil"], out / "accuracy_matrix.png")
    for lg in loggers:
        lg.log_metrics({f"cl/{k}": v for k, v in summary(R["cil"]).items()}, step=T)
        if hasattr(lg, "log_image"):
            lg.log_image(key="cl/plots", images=[str(curve), str(heat)])
        lg.save()
    return results


def readout_results(R: dict, seen_acc, seen_acc_val, names: list[str], seen_other: dict) -> dict:
    """Per read-out: its four matrices with their summaries and its final Class-IL (test, validation)."""
    out = {}
    for i, r in enumerate(names):
        prefix = "" if i == 0 else f"{r}:"
        test, val = (seen_acc, seen_acc_val) if i == 0 else (seen_other[r]["test"], seen_other[r]["val"])
        out[r] = {**{key: {"R": R[prefix + name], **summary(R[prefix + name])} for name, key in MATRIX_KEYS.items()},
                  "final_class_il_accuracy": test[-1], "final_class_il_accuracy_val": val[-1]}
    return out


def accuracy_matrix_csv(R: dict) -> str:
    """Every matrix of ``R``: the primary read-out's as class_il, task_il, ...; another read-out's as <read-out>:class_il."""
    T = len(R["cil"])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["setting", "after_increment"] + [f"inc{j + 1}" for j in range(T)])
    prefixes = [""] + sorted({k.split(":")[0] + ":" for k in R if ":" in k})
    for prefix in prefixes:
        for name, label in MATRIX_KEYS.items():
            for i in range(T):
                w.writerow([prefix + label, i + 1] + ["" if np.isnan(v) else f"{v:.4f}" for v in R[prefix + name][i]])
    return buf.getvalue()
