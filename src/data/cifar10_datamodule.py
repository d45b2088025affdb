"""CIFAR-10 as a LightningDataModule: in-memory uint8 tensors, stratified seeded subset and validation
split, and two-class increments for class-incremental learning."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytorch_lightning as pl
import torch

from src.data.cifar10 import MEAN, STD, DataError, load_cifar10
from src.data.loaders import CappedBatchSampler, InMemoryLoader, RandomBatchSampler
from src.data.transforms import BatchTransform

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_data_dir() -> str:
    return os.environ.get("DATA_DIR") or str(PROJECT_ROOT / "data")


def stratified_split(labels: torch.Tensor, per_class_counts: list[tuple[int, int | None]], seed: int):
    """For each class, permute its indices with ``seed`` and cut consecutive blocks of the given sizes.

    ``per_class_counts[c] = (n_first, n_second)``; ``n_second=None`` takes the rest. Returns two sorted
    index tensors that never overlap."""
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c, (n_a, n_b) in enumerate(per_class_counts):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        first.append(idx[:n_a])
        second.append(idx[n_a:] if n_b is None else idx[n_a : n_a + n_b])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def per_class(total: int | None, num_classes: int) -> list[int | None]:
    if total is None:
        return [None] * num_classes
    base, extra = divmod(total, num_classes)
    return [base + (1 if c < extra else 0) for c in range(num_classes)]


# per-channel statistics the images are normalised with: CIFAR-10's own (training from scratch) or ImageNet's
# (what torchvision's pretrained weights were trained on)
NORMALIZATION = {"cifar10": (MEAN, STD), "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


class CIFAR10DataModule(pl.LightningDataModule):
    num_classes = 10

    def __init__(
        self,
        data_dir: str | None = None,
        download: bool = False,
        subset_size: int | None = None,
        val_size: int = 1000,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        class_order: list[int] | None = None,
        classes_per_increment: int = 2,
        increment: int | None = None,
        cumulative: bool = False,
        augment: bool = True,
        crop_padding: int = 4,
        input_size: int | None = None,
        keep_on_device: bool = True,
        seed: int = 0,
        test_split: str = "test",
        normalization: str = "cifar10",
    ):
        super().__init__()
        self.data_dir = Path(data_dir) if data_dir else Path(default_data_dir())
        self.download = download
        self.subset_size, self.val_size = subset_size, val_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.class_order = list(range(self.num_classes)) if class_order is None else [int(c) for c in class_order]
        self.classes_per_increment = classes_per_increment
        self.cumulative = cumulative
        self.augment, self.keep_on_device, self.seed = augment, keep_on_device, seed
        if test_split not in ("test", "val"):
            raise ValueError(f"data.test_split must be test or val, got {test_split!r}")
        self.test_split = test_split  # val: the test procedure on the validation split (src.eval split=val)
        if normalization not in NORMALIZATION:
            raise ValueError(f"data.normalization must be one of {', '.join(NORMALIZATION)}, got {normalization!r}")
        mean, std = NORMALIZATION[normalization]
        self.transform = BatchTransform(mean, std, crop_padding=crop_padding, input_size=input_size)
        self._validate()
        self.increment = increment
        self.memory_indices = torch.empty(0, dtype=torch.long)  # extra train-pool images (replay buffer)
        # when set, the increment trains on exactly these train-pool images (the continual runner's class-balanced phase)
        self.only_indices: torch.Tensor | None = None
        # when set, each training epoch draws only as many whole batches as this many images fill (the rest of the
        # training set is not seen that epoch): the continual joint strategy at a memory strategy's budget
        self.epoch_images: int | None = None
        self._raw: dict[str, torch.Tensor] | None = None

    # ---- configuration checks -------------------------------------------------------------------
    def _validate(self) -> None:
        n = self.num_classes
        if sorted(self.class_order) != list(range(n)):
            raise ValueError(f"data.class_order must be a permutation of 0..{n - 1}, got {self.class_order}")
        if self.classes_per_increment < 1 or n % self.classes_per_increment:
            raise ValueError(f"data.classes_per_increment must divide {n}, got {self.classes_per_increment}")
        if self.subset_size is not None and self.subset_size < n:
            raise ValueError(f"data.subset_size must be null or >= {n} (one image per class), got {self.subset_size}")
        if self.val_size < 0:
            raise ValueError(f"data.val_size must be >= 0, got {self.val_size}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")

    @property
    def num_increments(self) -> int:
        return self.num_classes // self.classes_per_increment

    @property
    def increment(self) -> int | None:
        return self._increment

    @increment.setter
    def increment(self, t: int | None) -> None:
        if t is not None and not 0 <= t < self.num_increments:
            raise ValueError(f"data.increment must be null or in 0..{self.num_increments - 1}, got {t}")
        self._increment = t

    def classes_of_increment(self, t: int) -> list[int]:
        k = self.classes_per_increment
        return self.class_order[t * k : (t + 1) * k]

    @property
    def increment_classes(self) -> list[int]:
        """Classes the current increment trains on (all classes when ``increment`` is null)."""
        if self.increment is None:
            return list(self.class_order)
        if self.cumulative:
            return self.seen_classes
        return self.classes_of_increment(self.increment)

    @property
    def seen_classes(self) -> list[int]:
        if self.increment is None:
            return list(self.class_order)
        return self.class_order[: (self.increment + 1) * self.classes_per_increment]

    # ---- data ---------------------------------------------------------------------------------
    def load_raw(self) -> dict[str, torch.Tensor]:
        return load_cifar10(self.data_dir, download=self.download)

    def prepare_data(self) -> None:
        if self.download and not (self.data_dir / "cifar-10-batches-py").is_dir():
            self.load_raw()

    def setup(self, stage: str | None = None) -> None:
        if self._raw is not None:
            return
        raw = self.load_raw()
        train_y = raw["train_y"]
        counts = torch.bincount(train_y, minlength=self.num_classes)
        val_pc = per_class(self.val_size, self.num_classes)
        sub_pc = per_class(self.subset_size, self.num_classes)
        for c in range(self.num_classes):
            need = val_pc[c] + (sub_pc[c] or 1)
            if need > counts[c]:
                raise DataError(
                    f"class {c} has {int(counts[c])} training images but data.val_size + data.subset_size need "
                    f"{need} of them; lower data.subset_size or data.val_size"
                )
        self.val_pool, self.train_pool = stratified_split(train_y, list(zip(val_pc, sub_pc)), self.seed)
        self._raw = raw

    def _require_setup(self) -> dict[str, torch.Tensor]:
        if self._raw is None:
            self.setup()
        return self._raw

    def _in_classes(self, labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
        return torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))

    @property
    def train_indices(self) -> torch.Tensor:
        """Indices into the full CIFAR train array of the images the current increment trains on."""
        raw = self._require_setup()
        if self.only_indices is not None:
            return self.only_indices.sort().values  # CIFAR order: the classes interleaved, as below
        pool = self.train_pool[self._in_classes(raw["train_y"][self.train_pool], self.increment_classes)]
        if len(self.memory_indices):
            # Sorted by CIFAR index, i.e. classes interleaved as in the shuffled original: an appended
            # block of exemplars would fill whole batches of the BN re-estimation pass with old classes,
            # skewing the statistics that embed the new classes (their test accuracy collapsed).
            pool = torch.cat([pool, self.memory_indices[~torch.isin(self.memory_indices, pool)]]).sort().values
        return pool

    def train_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        raw, idx = self._require_setup(), self.train_indices
        return raw["train_x"][idx], raw["train_y"][idx]

    def pool_arrays(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self._require_setup()
        return raw["train_x"][indices], raw["train_y"][indices]

    def train_labels(self, indices: torch.Tensor) -> torch.Tensor:
        """Labels of positions in the full CIFAR train array (e.g. ``train_pool``)."""
        return self._require_setup()["train_y"][indices]

    def val_arrays(self, classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation split of ``classes`` (default: the classes the current increment trains on)."""
        raw = self._require_setup()
        classes = self.increment_classes if classes is None else classes
        idx = self.val_pool[self._in_classes(raw["train_y"][self.val_pool], classes)]
        return raw["train_x"][idx], raw["train_y"][idx]

    def test_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self._require_setup()
        keep = self._in_classes(raw["test_y"], self.seen_classes)
        return raw["test_x"][keep], raw["test_y"][keep]

    # ---- loaders ------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _device(self):
        trainer = self.trainer
        if trainer is not None and self.keep_on_device and trainer.strategy.root_device.type != "cpu":
            return trainer.strategy.root_device
        return None

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _loader(self, images, labels, batch_sampler) -> InMemoryLoader:
        loader = InMemoryLoader(images, labels, batch_sampler, epoch_fn=self._epoch)
        device = self._device()
        return loader.to(device) if device is not None else loader

    def train_dataloader(self) -> InMemoryLoader:
        x, y = self.train_arrays()
        rank, world = self._rank_world()
        # The model decides how it is batched (magnet: neighbourhood batches around its cluster index)
        model = self.trainer.lightning_module if self.trainer is not None else None
        sampler = None
        if hasattr(model, "train_batch_sampler"):
            sampler = model.train_batch_sampler(len(y), self.seed, self.increment, rank, world)
        if sampler is None:
            sampler = RandomBatchSampler(len(y), self.batch_size, self.seed, shuffle=True, rank=rank, world_size=world,
                                         increment=self.increment)
        if self.epoch_images is not None:
            # as many batches as a training set of epoch_images would give (per rank), each epoch a fresh draw
            sampler = CappedBatchSampler(sampler, math.ceil(math.ceil(self.epoch_images / sampler.batch_size) / world))
        return self._loader(x, y, sampler)

    def eval_loader(self, images: torch.Tensor, labels: torch.Tensor, shard: bool = True) -> InMemoryLoader:
        rank, world = self._rank_world() if shard else (0, 1)
        sampler = RandomBatchSampler(len(labels), self.eval_batch_size, shuffle=False, rank=rank, world_size=world)
        return self._loader(images, labels, sampler)

    def val_dataloader(self) -> InMemoryLoader:
        return self.eval_loader(*self.val_arrays())

    def test_dataloader(self) -> InMemoryLoader:
        return self.eval_loader(*(self.val_arrays() if self.test_split == "val" else self.test_arrays()))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y, idx = batch
        training = self.trainer is not None and self.trainer.training
        return self.transform(x, train=training and self.augment), y, idx
