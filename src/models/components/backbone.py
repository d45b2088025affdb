"""GoogLeNet trunk (torchvision) with a projection head that gives the embedding."""
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
        raise FileNotFoundError(f"model.backbone.pretrained={path} is not a file; give a saved state dict, true or false")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def build_googlenet(pretrained: bool | str = False, dropout: float = 0.2) -> nn.Module:
    """GoogLeNet without aux heads, returning the 1024-d pooled feature.

    ``pretrained``: False (random init), True (torchvision ImageNet weights: downloaded, or taken from the
    torch cache) or a path to a state dict (a GoogLeNet's; its fc/aux heads are ignored)."""
    # Inputs are normalized with CIFAR statistics by the datamodule, so torchvision's ImageNet
    # re-normalization (transform_input) is always off.
    if pretrained is True or (isinstance(pretrained, str) and pretrained.lower() == "true"):
        net = googlenet(weights=GoogLeNet_Weights.IMAGENET1K_V1, transform_input=False, dropout=dropout)
        net.aux_logits, net.aux1, net.aux2 = False, None, None
    else:
        net = googlenet(weights=None, aux_logits=False, init_weights=True, transform_input=False, dropout=dropout)
        if pretrained not in (False, None) and str(pretrained).lower() != "false":
            state = _load_state_dict_file(Path(str(pretrained)).expanduser())
            state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2.", "fc."))}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(
                    f"{pretrained} is not a GoogLeNet state dict: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
    net.fc = nn.Identity()
    return net


class EmbeddingNet(nn.Module):
    """trunk -> projection head (embedding) -> optional linear classifier on the embedding."""

    def __init__(self, embedding_dim: int = 128, num_classes: int = 10, pretrained: bool | str = False,
                 dropout: float = 0.2, head: str = "linear", normalize: bool = False, channels_last: bool = False):
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"model.net.embedding_dim must be >= 1, got {embedding_dim}")
        if head not in ("linear", "mlp", "identity"):
            raise ValueError(f"model.net.head must be linear, mlp or identity, got {head!r}")
        self.trunk = build_googlenet(pretrained, dropout)
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
