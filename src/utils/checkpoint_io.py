"""Checkpoints written to a temporary file and renamed into place, so a kill during a save never
leaves a file that looks like a valid checkpoint but is truncated."""
from __future__ import annotations

import io

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from src.utils.io import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if "://" in str(path):  # remote filesystems: leave it to fsspec
            return super().save_checkpoint(checkpoint, path, storage_options)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(path, buf.getvalue())
