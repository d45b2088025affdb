"""What every embedding model shares: the network, optimizer set-up, and validation/test evaluation
(magnet rule, k-NN, NMI, MAP@R, attribute concentration, t-SNE)."""
from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from src.data.cifar10 import CLASSES
from src.models.components.cluster_index import ClusterState
from src.models.components.magnet_loss import magnet_predict
from src.models.components.phased_schedule import phased_schedule
from src.utils import metrics as M
from src.utils.distributed import gather_uneven

log = logging.getLogger(__name__)


class EmbeddingModule(pl.LightningModule):
    uses_training_index = False  # does training need the cluster index rebuilt during fit?
    uses_neighbourhood_sampler = False
    predicts_with_logits = False  # continual evaluation: classifier logits (True) or the magnet rule on centroids

    def __init__(self, net: nn.Module, optimizer, scheduler=None, num_classes: int = 10, clusters: dict | None = None,
                 evaluation: dict | None = None, attributes: dict | None = None, warmup_epochs: int | None = 0,
                 warmup_fraction: float | None = None, lr_scale_after_warmup: float = 1.0,
                 lr_cap_after_warmup: float | None = None, schedule_per_phase: bool = False, compile: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss"], logger=False)
        self.net = net
        self.num_classes = num_classes
        clusters = dict(clusters or {})
        if "split_epoch" in clusters:
            raise ValueError("model.clusters.split_epoch was replaced by model.clusters.split_fraction (the fraction of "
                             "trainer.max_epochs trained with K_initial, e.g. 0.7); rename the key")
        self.K = int(clusters.get("K", 1))
        # Optional K schedule (not in the paper): K_initial clusters per class for the first split_fraction of
        # the run's epochs, then K. A fraction, not an epoch, so a shorter run still trains and tests its final K.
        self.K_initial = int(clusters.get("K_initial") or self.K)
        self.split_fraction = clusters.get("split_fraction")
        self.M = int(clusters.get("M", 2))
        self.D = int(clusters.get("D", 1))
        self.L = int(clusters.get("L", 128))
        self.random_clusters = int(clusters.get("random_clusters", 0))
        self.seed_weight = str(clusters.get("seed_weight", "mean_loss"))
        self.quota_power = float(clusters.get("quota_power", 0.0))
        self.warmup_batches = str(clusters.get("warmup_batches", "iid"))
        if self.K < 1 or self.L < 1 or self.K_initial < 1:
            raise ValueError(f"model.clusters.K and L must be >= 1, got K={self.K}, L={self.L}")
        if self.split_fraction is not None and not 0 <= float(self.split_fraction) < 1:
            raise ValueError(f"model.clusters.split_fraction must be null or in [0, 1), got {self.split_fraction}")
        self.evaluation = {"attribute_k": [10, 50, 100], "tsne_per_class": 100, "tsne": True, **(evaluation or {})}
        self.attributes = dict(attributes or {})
        # The warm-up's length: absolute (model.warmup_epochs) or a fraction of trainer.max_epochs
        # (model.warmup_fraction), so that a shortened run keeps the same share of method epochs.
        if warmup_epochs is not None and warmup_fraction is not None:
            raise ValueError(f"model.warmup_epochs={warmup_epochs} and model.warmup_fraction={warmup_fraction} are both "
                             "set; set one of them to null")
        if warmup_fraction is not None and not 0 <= float(warmup_fraction) < 1:
            raise ValueError(f"model.warmup_fraction must be null or in [0, 1), got {warmup_fraction}")
        self.warmup_fraction = None if warmup_fraction is None else float(warmup_fraction)
        self._warmup_epochs = int(warmup_epochs or 0)
        if self._warmup_epochs < 0:
            raise ValueError(f"model.warmup_epochs must be >= 0, got {warmup_epochs}")
        if lr_cap_after_warmup is not None and not lr_cap_after_warmup > 0:
            raise ValueError(f"model.lr_cap_after_warmup must be null or > 0, got {lr_cap_after_warmup}")
        # An upper bound on the learning rate once the method's own loss trains (null = none). A full-length run's
        # method epochs sit in an annealed tail far below it; a shortened run's would otherwise train at up to the
        # cycle's peak rate, where frozen BatchNorm with the head's cross-entropy overflows.
        self.lr_cap_after_warmup = None if lr_cap_after_warmup is None else float(lr_cap_after_warmup)
        if not lr_scale_after_warmup > 0:
            raise ValueError(f"model.lr_scale_after_warmup must be > 0, got {lr_scale_after_warmup}")
        # The scheduler's learning rate times this factor after the warm-up (1 = off). Magnet's cross-entropy
        # warm-up stands in for a pretrained start, and the paper fine-tunes such a start at a lower rate; softmax
        # takes the same two phases (cross-entropy in both) as the control that isolates what the loss adds.
        self.lr_scale_after_warmup = float(lr_scale_after_warmup)
        # True: model.scheduler runs its full cycle over the warm-up epochs and again over the epochs after them
        # (src.models.components.phased_schedule), so the second phase starts from an annealed network.
        self.schedule_per_phase = bool(schedule_per_phase)
        if not isinstance(compile, bool):
            raise ValueError(f"model.compile must be true or false, got {compile!r}")
        self.compile_net = compile
        self.cluster_state = ClusterState()
        self._failures: dict | None = None  # device flags of the steps since the last host check (see _flag)
        self.index_fresh = False  # was the index rebuilt from this epoch's final weights (validation may select)?
        self.train_reference: tuple[torch.Tensor, torch.Tensor] | None = None  # train embeddings for k-NN
        self.strategy = None  # a continual strategy (src/continual/strategies), when one drives training
        # Factor on every learning rate the optimizer and scheduler give: 1 except in a continual increment after the
        # first, where the runner sets continual.later_lr_scale (see lr_factor).
        self.lr_scale = 1.0
        self.output_dir: Path | None = None
        self.run_config: dict | None = None  # the resolved Hydra config, saved into checkpoints
        self.test_results: dict[str, float] = {}
        # the last test pass's embeddings and labels (CPU): read-out analyses reuse them instead of a second pass
        self.test_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
        self._eval_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def _max_epochs(self, max_epochs: int | None) -> int | None:
        if max_epochs is None and self._trainer is not None:
            max_epochs = self._trainer.max_epochs
        return None if max_epochs is None or max_epochs < 0 else int(max_epochs)

    def split_epoch(self, max_epochs: int | None = None) -> int | None:
        """First epoch trained with the final K, or None without a schedule."""
        if self.split_fraction is None or self.K_initial == self.K:
            return None
        max_epochs = self._max_epochs(max_epochs)
        if max_epochs is None:
            raise ValueError("model.clusters.split_fraction needs a finite trainer.max_epochs; set one or "
                             "model.clusters.split_fraction=null")
        return math.floor(round(float(self.split_fraction) * max_epochs, 6))

    def clusters_per_class(self, epoch: int | None, max_epochs: int | None = None) -> int:
        """K for training epoch ``epoch``; ``None`` (testing, evaluation) means the final K."""
        split = None if epoch is None else self.split_epoch(max_epochs)
        if split is None or epoch >= split:
            return self.K
        return self.K_initial

    def selection_start_epoch(self, max_epochs: int | None = None) -> int:
        """First epoch whose checkpoint may be selected: the method must be in its final form."""
        return max(self.warmup_epochs, self.split_epoch(max_epochs) or 0)

    def warmup_epochs_for(self, max_epochs: int | None) -> int:
        """The warm-up's length in a run of ``max_epochs`` epochs."""
        if self.warmup_fraction is None:
            return self._warmup_epochs
        if max_epochs is None or max_epochs < 0:
            raise ValueError("model.warmup_fraction needs a finite trainer.max_epochs; set one or use "
                             "model.warmup_epochs (absolute) with model.warmup_fraction=null")
        return math.floor(round(self.warmup_fraction * max_epochs, 6))

    @property
    def warmup_epochs(self) -> int:
        """Cross-entropy epochs before the method's own loss, in the attached trainer's run."""
        return self.warmup_epochs_for(self._max_epochs(None) if self.warmup_fraction is not None else None)

    @warmup_epochs.setter
    def warmup_epochs(self, epochs: int) -> None:
        # an absolute length replaces a fraction (the continual runner sets each increment's)
        self._warmup_epochs, self.warmup_fraction = int(epochs), None

    def in_warmup(self) -> bool:
        """Is the current epoch one of the first phase's (model.warmup_epochs)?"""
        return self.current_epoch < self.warmup_epochs

    def needs_index_for_training(self, epoch: int) -> bool:
        return self.uses_neighbourhood_sampler and epoch >= self.warmup_epochs

    def train_batch_sampler(self, num_examples: int, seed: int, increment: int | None, rank: int, world_size: int):
        """The batch sampler this model trains with; None: the datamodule's iid batches."""
        return None

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.cluster_state.reset()  # a new training set (e.g. the next increment) needs a new index

    def on_fit_start(self) -> None:
        self.check_training_plan()

    def check_training_plan(self) -> None:
        """One-line errors for a run that would never train or test the method in its final form."""
        trainer = self.trainer
        # the callback marks itself (builds_cluster_index): models never import callbacks
        if self.uses_training_index and not any(getattr(cb, "builds_cluster_index", False) for cb in trainer.callbacks):
            raise ValueError(f"{type(self).__name__} needs the re-clustering callback for its cluster index; add "
                             "callbacks.recluster (conf/callbacks/recluster.yaml) to the run's callbacks")
        max_epochs = self._max_epochs(None)
        if max_epochs is None:
            self.split_epoch()  # a schedule needs a finite run: raises with the keys to set
            return
        # (a split_fraction < 1 always leaves its last epoch to the final K; the warm-up may not)
        if self.selection_start_epoch() >= max_epochs:
            warmup = (f"model.warmup_epochs={self.warmup_epochs}" if self.warmup_fraction is None else
                      f"model.warmup_fraction={self.warmup_fraction} ({self.warmup_epochs} epochs)")
            raise ValueError(f"{warmup} and model.clusters.split_fraction={self.split_fraction} leave no epoch "
                             f"trained with the method's own loss and final K={self.K} within trainer.max_epochs={max_epochs}; lower them or raise trainer.max_epochs")
        # softmax selects from epoch 0, so the check above lets its warm-up fill the run; a phased schedule cannot
        if self.schedule_per_phase and 0 < self.warmup_epochs and self.warmup_epochs >= max_epochs:
            raise ValueError(f"model.schedule_per_phase=true with model.warmup_epochs={self.warmup_epochs} leaves no "
                             f"second phase within trainer.max_epochs={max_epochs}; lower model.warmup_epochs")

    # ---- model ----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """``model.compile=true``: compile the network in place (its state-dict keys do not change), once, on the
        device the trainer runs on. Every caller of ``self.net`` (training step, re-clustering, evaluation,
        exemplar selection) then runs compiled; each distinct batch shape compiles once (``dynamic=False``).
        On a GPU, mode ``reduce-overhead`` adds CUDA graphs, which the fixed M x D neighbourhood batches and the
        sync-free step allow. On this project's 2-core CPU compile was 0.88x eager for training after 224 s of
        compiling (``benchmarks/memory_format.py --compile``), hence the default ``false``."""
        if not self.compile_net or getattr(self.net, "_compiled_call_impl", None) is not None:
            return
        on_cuda = self.trainer.strategy.root_device.type == "cuda"
        self.net.compile(mode="reduce-overhead" if on_cuda else None, dynamic=False)
        log.info("model.compile: network compiled (mode %s)", "reduce-overhead" if on_cuda else "default")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self):
        if self.lr_scale_after_warmup != 1.0 and self.hparams.scheduler is None:
            raise ValueError("model.lr_scale_after_warmup scales the scheduler's learning rate and needs a "
                             "model.scheduler; set one or model.lr_scale_after_warmup=1.0")
        if self.schedule_per_phase and (self.hparams.scheduler is None or not self.scheduler_takes_total_steps()):
            raise ValueError("model.schedule_per_phase restarts a scheduler that takes total_steps (e.g. OneCycleLR) "
                             "at the end of the warm-up; set model.scheduler=onecycle or model.schedule_per_phase=false")
        if self.lr_cap_after_warmup is not None and self.hparams.scheduler is None:
            raise ValueError("model.lr_cap_after_warmup bounds the scheduler's learning rate and needs a "
                             "model.scheduler; set one or model.lr_cap_after_warmup=null")
        opt = self.hparams.optimizer(params=self.parameters())
        if self.hparams.scheduler is None:
            for group in opt.param_groups:  # a constant rate: scaled once
                group["lr"] *= self.lr_factor()
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.build_scheduler(opt), "interval": "step"}}

    def lr_factor(self) -> float:
        """What the scheduler's learning rate is multiplied by at the current epoch."""
        return self.lr_scale * (1.0 if self.in_warmup() else self.lr_scale_after_warmup)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        super().lr_scheduler_step(scheduler, metric)
        self.apply_lr_factor(scheduler)

    def on_train_epoch_start(self) -> None:
        # Before the epoch's first step: the first epoch's rate (the scheduler has not stepped yet), or a factor
        # that changed with the epoch (MagnetModule's warm-up). Set from the scheduler's own value, so it is
        # idempotent (e.g. after a resume).
        for config in self.trainer.lr_scheduler_configs:
            self.apply_lr_factor(config.scheduler)

    def apply_lr_factor(self, scheduler) -> None:
        # Schedulers such as OneCycleLR compute each rate from their own state, not from the group's current
        # rate, so overwriting the group's rate after each step scales the schedule without compounding.
        factor = self.lr_factor()
        cap = None if self.in_warmup() else self.lr_cap_after_warmup
        if factor == 1.0 and cap is None:
            return
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr * factor if cap is None else min(lr * factor, cap)

    def scheduler_takes_total_steps(self) -> bool:
        return "total_steps" in inspect.signature(self.hparams.scheduler.func).parameters

    def build_scheduler(self, optimizer):
        """model.scheduler over the whole run, or once per phase (model.schedule_per_phase), stepped every
        training step."""
        max_epochs = self._max_epochs(None)
        if self.schedule_per_phase and self.warmup_epochs > 0 and max_epochs is not None:
            self.check_training_plan()  # (configure_optimizers runs before on_fit_start) a second phase exists
            steps_per_epoch = max(int(self.trainer.estimated_stepping_batches) // max_epochs, 1)
            phases = [self.warmup_epochs * steps_per_epoch, (max_epochs - self.warmup_epochs) * steps_per_epoch]
            return phased_schedule(optimizer, self.hparams.scheduler, phases)
        # one phase (e.g. a continual increment after the first)
        kwargs = {}
        if self.scheduler_takes_total_steps():
            # OneCycle divides by its phase lengths: a very short run (a smoke test) needs a floor
            kwargs["total_steps"] = max(int(self.trainer.estimated_stepping_batches), 10)
        return self.hparams.scheduler(optimizer=optimizer, **kwargs)

    def classifier_loss(self, emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy through the classifier head: the warm-up epochs before the method's own loss, and the optional
        auxiliary term (model.ce_weight)."""
        logits = self.net.classifier(emb)
        if self.strategy is not None:  # a continual strategy may restrict the classes each row competes over (ER-ACE)
            logits = self.strategy.restrict_logits(logits, y)
        loss = nn.functional.cross_entropy(logits, y)
        self.check_finite(loss, "cross-entropy loss")
        self.log_train({"train/ce": loss})
        return loss

    def training_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embeddings of a training batch, through the continual strategy's forward when one drives training."""
        return self(x) if self.strategy is None else self.strategy.forward(self, x)

    def observe(self, batch, emb: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Every training step's loss goes through here: a continual strategy may add to it (distillation)."""
        if self.strategy is None:
            return loss
        loss = self.strategy.observe(self, batch, emb, loss)
        self.check_finite(loss, "strategy-adjusted loss")
        return loss

    def log_train(self, metrics: dict[str, torch.Tensor], prog_bar: bool = True) -> None:
        """Training metrics are averaged on the device over the epoch and logged at its end: logging them per
        step would make the progress bar read each value back to the host (a sync every step)."""
        self.log_dict({k: v.detach() for k, v in metrics.items()}, on_step=False, on_epoch=True, prog_bar=prog_bar)

    # ---- failure checks without per-step host syncs ----------------------------------------------
    # A step records failures as device flags; the host reads them every ``host_check_every`` steps, before
    # validation and at the end of each epoch, and the error names the window of steps it happened in.
    host_check_every = 25

    def _flag(self, what: str, bad: torch.Tensor, error: type[Exception], advice: str) -> None:
        if self._failures is None:
            self._failures = {"flags": {}, "start": (self.current_epoch, self.global_step), "steps": 0}
        state = self._failures
        flag, _, _ = state["flags"].get(what, (None, None, None))
        state["flags"][what] = (bad if flag is None else flag | bad, error, advice)
        state["steps"] += 1
        if state["steps"] >= self.host_check_every * len(state["flags"]):
            self.raise_recorded_failures()

    def check_finite(self, loss: torch.Tensor, what: str) -> None:
        self._flag(f"{what} became nan or inf", ~torch.isfinite(loss.detach()), FloatingPointError,
                   "lower model.optimizer.lr or enable gradient clipping (trainer.gradient_clip_val=1.0)")

    def check_impostors(self, lacking: torch.Tensor) -> None:
        self._flag("a neighbourhood batch held an example with no cluster of another class", lacking, RuntimeError,
                   "its loss was set to 0; the index must hold at least two classes (check data.classes and the increment)")

    def raise_recorded_failures(self) -> None:
        """The one host read of the failure flags (a sync on an accelerator, nothing on the CPU)."""
        state, self._failures = self._failures, None
        if state is None:
            return
        (epoch, step) = state["start"]
        for what, (bad, error, advice) in state["flags"].items():
            if bool(bad):
                raise error(f"{what} between epoch {epoch} step {step} and epoch {self.current_epoch} step "
                            f"{self.global_step}; {advice}")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # at the epoch's last batch, before the re-clustering pass and validation read the weights
        if batch_idx + 1 >= self.trainer.num_training_batches:
            self.raise_recorded_failures()

    def on_validation_start(self) -> None:
        self.raise_recorded_failures()  # never validate, or checkpoint, weights from a failed window

    def on_train_epoch_end(self) -> None:
        self.raise_recorded_failures()

    # ---- index-based evaluation ---------------------------------------------------------------
    def eval_variance(self) -> float:
        index = self.cluster_state.index
        return index.variance if index is not None else float("nan")

    def magnet_probabilities(self, emb: torch.Tensor) -> torch.Tensor:
        """Magnet-rule class probabilities over every cluster of the current index."""
        index = self.cluster_state.index
        var = self.eval_variance()
        if not var > 0:
            raise RuntimeError("no positive variance for the magnet rule; was the model trained?")
        return magnet_predict(emb.cpu(), index.centroids, index.centroid_labels, var, self.num_classes, self.L)

    def classifier_logits(self, emb: torch.Tensor) -> torch.Tensor | None:
        return None

    # ---- validation / test --------------------------------------------------------------------
    def _eval_step(self, batch):
        x, y, _ = batch
        emb = self(x)
        logits = self.classifier_logits(emb)
        self._eval_outputs.append((emb.detach(), y.detach(), None if logits is None else logits.detach()))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def _gather_outputs(self):
        emb = torch.cat([o[0] for o in self._eval_outputs])
        y = torch.cat([o[1] for o in self._eval_outputs])
        logits = None if self._eval_outputs[0][2] is None else torch.cat([o[2] for o in self._eval_outputs])
        self._eval_outputs.clear()
        if self.trainer.world_size > 1:
            emb, y = gather_uneven(self, emb), gather_uneven(self, y)
            logits = None if logits is None else gather_uneven(self, logits)
        return emb.float().cpu(), y.cpu(), None if logits is None else logits.float().cpu()

    def validation_accuracy(self, emb, y, logits) -> dict[str, float]:
        out = {}
        if logits is not None:
            out["softmax_acc"] = M.accuracy(logits, y)
        if self.cluster_state.index is not None and self.eval_variance() > 0:
            out["magnet_acc"] = M.accuracy(self.magnet_probabilities(emb), y)
        return out

    def primary_val_metric(self, values: dict[str, float]) -> float:
        return values.get("magnet_acc", values.get("softmax_acc", float("nan")))

    def on_validation_epoch_end(self):
        if not self._eval_outputs:
            return
        emb, y, logits = self._gather_outputs()
        values = self.validation_accuracy(emb, y, logits)
        values["acc"] = self.primary_val_metric(values)
        if self.trainer.state.fn == "fit" and not self.selectable():
            values["acc"] = 0.0  # never select a warm-up or pre-split checkpoint, nor one measured on a stale index
        self.log_dict({f"val/{k}": v for k, v in values.items()}, prog_bar=True, sync_dist=False)

    def selectable(self) -> bool:
        if self.current_epoch < self.selection_start_epoch():
            return False
        return self.index_fresh or not self.uses_training_index

    def on_test_epoch_end(self):
        self.test_embeddings = None  # never an earlier pass's, when this one had no images
        if not self._eval_outputs:
            return
        emb, y, logits = self._gather_outputs()
        self.test_embeddings = (emb, y)
        results = self.evaluate_embeddings(emb, y, logits)
        self.test_results = results
        self.log_dict({f"test/{k}": v for k, v in results.items() if math.isfinite(v)})
        if self.evaluation.get("tsne") and self.trainer.is_global_zero and self.output_dir is not None:
            self.save_tsne(emb, y)

    def evaluate_embeddings(self, emb, y, logits) -> dict[str, float]:
        results = {}
        if logits is not None:
            results["softmax_acc"] = M.accuracy(logits, y)
        if self.cluster_state.index is not None:
            results["magnet_acc"] = M.accuracy(self.magnet_probabilities(emb), y)
            results["eval_variance"] = self.eval_variance()
        if self.train_reference is not None:
            results.update(M.retrieval_metrics(emb, y, *self.train_reference))
            results["ncm_acc"] = M.nearest_class_mean_accuracy(emb, y, *self.train_reference)
        if self.attributes:
            table = M.attribute_matrix(self.attributes, self.num_classes)
            for k in self.evaluation["attribute_k"]:
                results[f"attr_conc@{k}"] = M.attribute_concentration(emb, y, table, k)
                results[f"attr_conc_xclass@{k}"] = M.attribute_concentration(emb, y, table, k, cross_class=True)
        return results

    def save_tsne(self, emb, y) -> Path | None:
        """t-SNE of a stratified sample of the test embeddings: colour is the class, and the marker the point's
        cluster within its class (its nearest centroid of that class in the index), so K >= 2 modes show. Beside it,
        the attribute-concentration curves of the same embeddings (the seed paper's figure)."""
        from src.utils.plots import attribute_concentration_plot, tsne_plot

        pick = M.stratified_sample(y, int(self.evaluation["tsne_per_class"]), seed=0)
        clusters = self.own_class_cluster(emb[pick], y[pick])
        path = tsne_plot(emb[pick].numpy(), y[pick].numpy(), CLASSES, self.output_dir / "tsne.png",
                         clusters=None if clusters is None else clusters.numpy(),
                         title=f"t-SNE of test embeddings ({type(self).__name__}"
                               + (", marker: the cluster within its class)" if clusters is not None else ")"))
        images = [str(path)]
        if self.attributes:
            curves = {name: [self.test_results.get(f"{key}@{k}", float("nan")) for k in self.evaluation["attribute_k"]]
                      for name, key in (("k nearest neighbours", "attr_conc"),
                                        ("k nearest of other classes", "attr_conc_xclass"))}
            images.append(str(attribute_concentration_plot(
                list(self.evaluation["attribute_k"]), curves, self.output_dir / "attribute_concentration.png",
                title=f"Attribute concentration of test embeddings ({type(self).__name__})")))
        for lg in self.loggers:
            if hasattr(lg, "log_image"):
                lg.log_image(key="test/tsne", images=images)
        return path

    def own_class_cluster(self, emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Each point's rank among its own class's clusters in the index (0..K-1) by nearest centroid, or None when
        there is no index or a class has a single cluster."""
        index = self.cluster_state.index
        if index is None:
            return None
        centroids, labels = index.centroids.float().cpu(), index.centroid_labels.cpu()
        if int(torch.bincount(labels).max()) < 2:
            return None
        d = torch.cdist(emb.float(), centroids)
        d[y[:, None] != labels[None, :]] = float("inf")  # only the point's own class's clusters
        nearest = d.argmin(1)
        # a cluster's position among its class's clusters, so markers mean "first / second / ... mode"
        rank = torch.zeros(len(labels), dtype=torch.long)
        for c in torch.unique(labels).tolist():
            members = (labels == c).nonzero().flatten()
            rank[members] = torch.arange(len(members))
        return rank[nearest]

    # ---- checkpoint ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cluster_state"] = self.cluster_state.state_dict()
        if self.run_config is not None:
            checkpoint["config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "cluster_state" in checkpoint:
            self.cluster_state.load_state_dict(checkpoint["cluster_state"])
