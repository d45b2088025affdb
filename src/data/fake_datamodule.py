"""Small synthetic CIFAR-shaped data with learnable class structure, so tests need no real data."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from src.data.cifar10_datamodule import CIFAR10DataModule


def make_fake_cifar(train_per_class: int, test_per_class: int, seed: int = 0, num_classes: int = 10,
                    noise: float = 40.0) -> dict[str, torch.Tensor]:
    """Each class is a smooth random colour template plus per-image noise and a random shift, so a
    small CNN can separate the classes but not trivially."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False) * 200 + 28

    def draw(per_class: int):
        y = torch.arange(num_classes).repeat_interleave(per_class)
        x = templates[y] + noise * torch.randn(len(y), 3, 32, 32, generator=g)
        shifts = torch.randint(-3, 4, (len(y), 2), generator=g)
        x = torch.stack([torch.roll(img, tuple(s.tolist()), dims=(1, 2)) for img, s in zip(x, shifts)])
        return x.clamp(0, 255).to(torch.uint8), y

    train_x, train_y = draw(train_per_class)
    test_x, test_y = draw(test_per_class)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


class FakeDataModule(CIFAR10DataModule):
    def __init__(self, train_per_class: int = 60, test_per_class: int = 20, **kwargs):
        self.train_per_class, self.test_per_class = train_per_class, test_per_class
        super().__init__(**kwargs)

    def load_raw(self) -> dict[str, torch.Tensor]:
        return make_fake_cifar(self.train_per_class, self.test_per_class, seed=1234)

    def prepare_data(self) -> None:  # nothing to fetch
        pass
