"""GoogLeNet trunk (torchvision) with a projection head that gives the embedding.

``stem`` chooses what happens to a 32-px image before the Inception modules (which are always torchvision's):

| stem | conv1 | max-pools kept | inception3 / 4 / 5 run at |
|---|---|---|---|
| imagenet | 7x7 stride 2 (torchvision's) | both | 4x4 / 2x2 / 1x1 |
| cifar8 | 3x3 stride 1 | both | 8x8 / 4x4 / 2x2 |
| cifar | 3x3 stride 1 | the one before inception3 | 16x16 / 8x8 / 4x4 |
| cifar32 | 3x3 stride 1 | none (kuangliu/pytorch-cifar's layout) | 32x32 / 16x16 / 8x8 |

Why these, from the step costs measured with cross-entropy (issue #12's table, ``benchmarks/stem_speed.py``):
at 32 px a GPU step is launch-bound, so `cifar` (16x16) costs about 15 % of torchvision's stem there while
keeping 16x more spatial detail at inception3; `cifar32` halves the GPU throughput again for the last 2x, so
`cifar` is the GPU choice. On a CPU the cost follows the FLOPs: `cifar8` is the only replacement stem within a
few times torchvision's, so it is the CPU-sized variant.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.models import GoogLeNet_Weights, googlenet

log = logging.getLogger(__name__)
FEATURE_DIM = 1024


def _load_state_dict_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"model.net.pretrained={path} is not a file; give a saved state dict, true or false")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


# stem -> (keep maxpool1, keep maxpool2); every stem but imagenet replaces conv1 by a 3x3 stride-1 convolution.
STEMS = {"imagenet": (True, True), "cifar8": (True, True), "cifar": (False, True), "cifar32": (False, False)}


def replace_stem(net: nn.Module, stem: str, pretrained: bool) -> None:
    """Swap torchvision's 7x7 stride-2 conv1 for a 3x3 stride-1 one and drop the max-pools ``stem`` drops."""
    if stem == "imagenet":
        return
    from torchvision.models.googlenet import BasicConv2d

    net.conv1 = BasicConv2d(3, 64, kernel_size=3, stride=1, padding=1)
    # torchvision's own initialisation for GoogLeNet convolutions (truncated normal, std 0.01).
    nn.init.trunc_normal_(net.conv1.conv.weight, mean=0.0, std=0.01, a=-2, b=2)
    keep1, keep2 = STEMS[stem]
    if not keep1:
        net.maxpool1 = nn.Identity()
    if not keep2:
        net.maxpool2 = nn.Identity()
    if pretrained:
        log.warning("model.net.stem=%s: conv1.conv.weight, conv1.bn.weight, conv1.bn.bias and conv1.bn running "
                    "statistics are freshly initialised (a 3x3 stride-1 stem); every other pretrained weight is "
                    "loaded", stem)


def build_googlenet(pretrained: bool | str = False, dropout: float = 0.2, stem: str = "imagenet") -> nn.Module:
    """GoogLeNet without aux heads, returning the 1024-d pooled feature.

    ``pretrained``: False (random init), True (torchvision ImageNet weights: downloaded, or taken from the
    torch cache) or a path to a state dict (a GoogLeNet's; its fc/aux heads are ignored).
    ``stem``: see the module docstring; a replaced stem keeps every pretrained weight except conv1's."""
    if stem not in STEMS:
        raise ValueError(f"model.net.stem must be one of {', '.join(STEMS)}, got {stem!r}")
    # Inputs are normalized with CIFAR statistics by the datamodule, so torchvision's ImageNet
    # re-normalization (transform_input) is always off.
    from_torchvision = str(pretrained).lower() == "true"  # True, or "true" from the command line
    from_file = not from_torchvision and pretrained not in (False, None) and str(pretrained).lower() != "false"
    if from_torchvision:
        net = googlenet(weights=GoogLeNet_Weights.IMAGENET1K_V1, transform_input=False, dropout=dropout)
        net.aux_logits, net.aux1, net.aux2 = False, None, None
    else:
        net = googlenet(weights=None, aux_logits=False, init_weights=True, transform_input=False, dropout=dropout)
        if from_file:
            state = _load_state_dict_file(Path(str(pretrained)).expanduser())
            state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2.", "fc."))}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(
                    f"{pretrained} is not a GoogLeNet state dict: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
    net.fc = nn.Identity()
    replace_stem(net, stem, pretrained=from_torchvision or from_file)
    return net


class EmbeddingNet(nn.Module):
    """trunk -> projection head (embedding) -> optional linear classifier on the embedding."""

    def __init__(self, embedding_dim: int = 128, num_classes: int = 10, pretrained: bool | str = False,
                 dropout: float = 0.2, head: str = "linear", normalize: bool = False, channels_last: bool = False,
                 stem: str = "imagenet"):
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"model.net.embedding_dim must be >= 1, got {embedding_dim}")
        if head not in ("linear", "mlp", "identity"):
            raise ValueError(f"model.net.head must be linear, mlp or identity, got {head!r}")
        self.trunk = build_googlenet(pretrained, dropout, stem)
        if head == "linear":
            self.head = nn.Linear(FEATURE_DIM, embedding_dim)
        elif head == "mlp":
            self.head = nn.Sequential(nn.Linear(FEATURE_DIM, FEATURE_DIM), nn.ReLU(inplace=True),
                                      nn.Linear(FEATURE_DIM, embedding_dim))
        else:
            self.head, embedding_dim = nn.Identity(), FEATURE_DIM
        self.embedding_dim = embedding_dim
        self.normalize = normalize
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        emb = self.head(self.trunk(x))
        return nn.functional.normalize(emb, dim=1) if self.normalize else emb
