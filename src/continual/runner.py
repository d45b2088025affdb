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
from omegaconf import DictConfig

from src.callbacks.recluster import ReclusterCallback, embed_images
from src.data.cifar10 import CLASSES
from src.models.components.magnet_loss import magnet_predict
from src.utils import cl_metrics
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


def class_il_task_il(module, datamodule, strategy, t: int) -> tuple[list[float], list[float]]:
    test_x, test_y = datamodule.test_arrays()
    emb = embed_images(module, datamodule, test_x).cpu()
    centroids, labels = strategy.eval_centroids(datamodule.seen_classes, module)
    increments = [datamodule.classes_of_increment(j) for j in range(t + 1)]
    return cil_til_accuracies(emb, test_y, centroids, labels, module.eval_variance(), increments,
                              module.num_classes, module.L)


def summary(R: np.ndarray) -> dict[str, float]:
    return {
        "average_accuracy": cl_metrics.average_accuracy(R),
        "average_incremental_accuracy": cl_metrics.average_incremental_accuracy(R),
        "forgetting": cl_metrics.forgetting(R),
        "backward_transfer": cl_metrics.backward_transfer(R),
    }


def save_state(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


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
    R_cil, R_til = np.full((T, T), np.nan), np.full((T, T), np.nan)
    seen_acc, times, start_t = [], [], 0
    warmup = module.warmup_epochs
    state_path = out / "continual_state.pt"
    if cfg.get("ckpt_path"):
        state_path = Path(cfg.ckpt_path)
    if state_path.is_file() and cfg.get("resume", True):
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["model"])
        module.cluster_state.load_state_dict(state["cluster_state"])
        strategy.load_state_dict(state["strategy"])
        R_cil, R_til, seen_acc, times = state["R_cil"], state["R_til"], state["seen_acc"], state["times"]
        start_t = state["completed"] + 1
        log.info(f"resuming the sequence after increment {state['completed']} from {state_path}")
    loggers = instantiate_group(cfg.get("logger"))
    t0 = time.perf_counter()
    for t in range(start_t, T):
        inc_start = time.perf_counter()
        pl.seed_everything(cfg.seed + t, workers=True)  # per increment, so a resumed run repeats it exactly
        datamodule.increment = t
        module.warmup_epochs = warmup if t == 0 else 0
        strategy.begin_task(t, module, datamodule)
        callbacks = [cb for cb in instantiate_group(cfg.get("callbacks")) if not isinstance(cb, pl.callbacks.ModelCheckpoint)]
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=False, enable_checkpointing=False)
        log.info(f"increment {t}: classes {datamodule.increment_classes}, {len(datamodule.train_indices)} training images")
        trainer.fit(module, datamodule=datamodule)
        # Lightning hands the model back on the CPU after fit; the passes below belong on the device
        module.to(trainer.strategy.root_device)
        recluster = next(cb for cb in trainer.callbacks if isinstance(cb, ReclusterCallback))
        recluster.rebuild(trainer, module)  # an index from the final weights, on the current training set
        strategy.end_task(t, module, datamodule)
        datamodule.increment = t  # end_task may have changed the memory; evaluation sees all seen classes
        cil, til = class_il_task_il(module, datamodule, strategy, t)
        R_cil[t, : t + 1], R_til[t, : t + 1] = cil, til
        test_x, test_y = datamodule.test_arrays()
        weights = [int(torch.isin(test_y, torch.tensor(datamodule.classes_of_increment(j))).sum()) for j in range(t + 1)]
        seen_acc.append(float(np.average(cil, weights=weights)))
        times.append(time.perf_counter() - inc_start)
        log.info(f"increment {t}: Class-IL accuracy on seen classes {100 * seen_acc[-1]:.2f}% "
                 f"(per increment {[round(100 * a, 1) for a in cil]}), {times[-1]:.0f}s")
        for lg in loggers:
            lg.log_metrics({"cl/acc_seen": seen_acc[-1], "cl/task_il_mean": float(np.mean(til))}, step=t)
        if trainer.is_global_zero:
            save_state(state_path, {"completed": t, "model": module.state_dict(),
                                    "cluster_state": module.cluster_state.state_dict(),
                                    "strategy": strategy.state_dict(), "R_cil": R_cil, "R_til": R_til,
                                    "seen_acc": seen_acc, "times": times})
    results = write_outputs(cfg, out, datamodule, R_cil, R_til, seen_acc, times, time.perf_counter() - t0, loggers)
    return results


def write_outputs(cfg, out: Path, datamodule, R_cil, R_til, seen_acc, times, wall, loggers) -> dict:
    from src.utils.plots import accuracy_curve, accuracy_heatmap

    T = len(R_cil)
    table = [{"increment": t + 1, "classes": "-".join(CLASSES[c] for c in datamodule.classes_of_increment(t)),
              "class_ids": datamodule.classes_of_increment(t), "accuracy_seen": seen_acc[t]} for t in range(T)]
    results = {
        "task": cfg.get("task_name"), "experiment": cfg.get("experiment_name"), "strategy": cfg.strategy.get("_target_"),
        "seed": cfg.seed,
        "class_il": {"R": R_cil, **summary(R_cil)},
        "task_il": {"R": R_til, **summary(R_til)},
        "table": table,
        "final_class_il_accuracy": seen_acc[-1],
        "time/increments_s": times, "time/total_s": float(sum(times)), "time/this_process_s": wall,
        "output_dir": str(out),
    }
    atomic_write_json(out / "results.json", results)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["setting", "after_increment"] + [f"inc{j + 1}" for j in range(T)])
    for name, R in (("class_il", R_cil), ("task_il", R_til)):
        for i in range(T):
            w.writerow([name, i + 1] + ["" if np.isnan(v) else f"{v:.4f}" for v in R[i]])
    atomic_write_text(out / "accuracy_matrix.csv", buf.getvalue())
    curve = accuracy_curve({str(cfg.strategy.get("_target_", "")).rsplit(".", 1)[-1]: seen_acc}, out / "accuracy_curve.png")
    heat = accuracy_heatmap(R_cil, out / "accuracy_matrix.png")
    for lg in loggers:
        lg.log_metrics({f"cl/{k}": v for k, v in summary(R_cil).items()}, step=T)
        if hasattr(lg, "log_image"):
            lg.log_image(key="cl/plots", images=[str(curve), str(heat)])
        lg.save()
    return results
