"""One pass of a model over a set of uint8 images: what re-clustering, evaluation and the continual
strategies (exemplar selection, drift compensation) all need."""
from __future__ import annotations

import contextlib

import torch


def inference_autocast(module: torch.nn.Module, device: torch.device):
    """bf16 autocast for an embedding pass on a GPU when the module trains under bf16 mixed precision (as
    Lightning's step does), so the pass runs at the step's speed; float32 otherwise (CPU, or a 32-bit run)."""
    trainer = getattr(module, "_trainer", None)  # a LightningModule attached to a Trainer; None otherwise
    if device.type == "cuda" and trainer is not None and str(trainer.precision).startswith("bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batchnorm_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Every BatchNorm layer of ``module`` (1d, 2d, 3d and sync)."""
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def embed_images(module: torch.nn.Module, transform, images: torch.Tensor, batch_size: int = 500,
                 recalibrate_bn: bool = False, shard: tuple[int, int] = (0, 1), progress=None,
                 augment_seed: int | None = None) -> torch.Tensor:
    """Embeddings of ``images`` (uint8, ``transform(x, train=False)``, no augmentation) in eval mode.

    With ``recalibrate_bn`` the BatchNorm layers run in train mode with a cumulative average instead:
    the embeddings then use iid batch statistics and the running statistics are re-estimated on the
    way, in the same single pass. Neighbourhood batches hold few, similar classes, so the statistics
    BN gathered during training are biased; this undoes that before clustering and evaluation. The
    result does not depend on the running statistics the model had before, so the pass is a pure
    function of the weights: repeating it on a checkpoint reproduces the same embeddings.

    ``augment_seed`` (with ``recalibrate_bn``): the pass sees the images augmented as in training
    (``transform(x, train=True)``), drawn from a generator seeded with it, so the re-estimated statistics
    are those of the inputs the network trained on, as the running statistics of an iid-trained model are
    (``callbacks.recluster.bn_pass_augment``; docs/magnet_investigation.md has what it measured)."""
    if augment_seed is not None and not recalibrate_bn:
        raise ValueError("embed_images: augment_seed augments the BatchNorm re-estimation pass and needs recalibrate_bn")
    rank, world = shard
    positions = torch.arange(rank, len(images), world)
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    bns = batchnorm_layers(module)
    saved_momentum = [bn.momentum for bn in bns]
    if recalibrate_bn:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
    generator = None
    if augment_seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(augment_seed) + rank)  # each shard its own draws, repeatable per shard
    out = []
    task = progress.add_task("embedding pass", total=len(positions)) if progress is not None else None
    with inference_autocast(module, device):
        for start in range(0, len(positions), batch_size):
            idx = positions[start : start + batch_size]
            x = transform(images[idx].to(device, non_blocking=True), train=generator is not None, generator=generator)
            out.append(module(x).float())
            if task is not None:
                progress.advance(task, len(idx))
    for bn, mom in zip(bns, saved_momentum):
        bn.momentum = mom
    module.train(was_training)
    if out:
        return torch.cat(out)
    return torch.empty(0, getattr(getattr(module, "net", module), "embedding_dim", 0), device=device)
