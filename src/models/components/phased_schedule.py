"""A learning-rate schedule that runs the configured scheduler once per training phase.

Magnet training has two phases: cross-entropy epochs standing in for a pretrained start, then magnet loss
fine-tuning that start. One scheduler over the whole run leaves the first phase mid-cycle (its last epoch
trains at a high rate), so the fine-tune starts from an unconverged network. Here each phase gets the
configured scheduler's full cycle over its own steps, restarted at the boundary.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


class LookupFactor:
    """Multiplier of the base learning rate at each step, from a precomputed table. A callable object rather
    than a lambda, so LambdaLR's state dict (and a checkpoint) can hold it as plain data."""

    def __init__(self, factors: Sequence[float]):
        self.factors = list(factors)

    def __call__(self, step: int) -> float:
        return self.factors[min(step, len(self.factors) - 1)]


def cycle_factors(make_scheduler: Callable, base_lr: float, steps: int) -> list[float]:
    """The rate ``make_scheduler(optimizer=..., total_steps=steps)`` sets at each of its ``steps`` steps, divided
    by ``base_lr``. Run on a throwaway one-parameter optimizer, so the real optimizer's state is untouched.
    OneCycle divides by its phase lengths: a phase under 10 steps (a smoke test) takes the first steps of a
    10-step cycle."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    cycle = max(steps, 10)
    scheduler = make_scheduler(optimizer=dummy, total_steps=cycle)
    factors = []
    for step in range(steps):
        factors.append(dummy.param_groups[0]["lr"] / base_lr)
        if step + 1 < cycle:  # the scheduler refuses a step past its total
            dummy.step()  # a no-op without gradients; keeps torch from warning about the call order
            scheduler.step()
    return factors


def phased_schedule(optimizer: torch.optim.Optimizer, make_scheduler: Callable, phase_steps: Sequence[int]) -> LambdaLR:
    """``make_scheduler`` (a scheduler taking ``total_steps``, e.g. OneCycleLR) run over each phase in turn: phase
    i covers the next ``phase_steps[i]`` steps with the scheduler's full cycle. A step past the last phase keeps
    its final rate."""
    if not phase_steps or any(int(n) < 1 for n in phase_steps):
        raise ValueError(f"every phase of a phased schedule needs at least one step, got {list(phase_steps)}")
    base_lr = optimizer.param_groups[0]["lr"]
    factors = [f for n in phase_steps for f in cycle_factors(make_scheduler, base_lr, int(n))]
    return LambdaLR(optimizer, LookupFactor(factors))
