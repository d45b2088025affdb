"""Continual-learning metrics as pure functions of the accuracy matrix.

R is a T x T float array: R[i][j] is the accuracy on increment j's test classes after training
increment i, with NaN above the diagonal (increments not seen yet)."""
from __future__ import annotations

import numpy as np


def _check(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 1:
        raise ValueError(f"R must be a square T x T matrix, got shape {R.shape}")
    if np.isnan(R[np.tril_indices(len(R))]).any():
        raise ValueError("R must be filled on and below the diagonal")
    return R


def average_accuracy(R) -> float:
    """Mean of the last row: accuracy over all increments after training the last one."""
    R = _check(R)
    return float(R[-1].mean())


def average_incremental_accuracy(R) -> float:
    """Mean over i of the mean of R[i][0..i]."""
    R = _check(R)
    return float(np.mean([R[i, : i + 1].mean() for i in range(len(R))]))


def forgetting(R) -> float:
    """Chaudhry et al.: mean over j < T-1 of max_{j<=l<T-1} R[l][j] - R[T-1][j]."""
    R = _check(R)
    T = len(R)
    if T < 2:
        return 0.0
    return float(np.mean([R[j : T - 1, j].max() - R[T - 1, j] for j in range(T - 1)]))


def backward_transfer(R) -> float:
    """Lopez-Paz & Ranzato: mean over j < T-1 of R[T-1][j] - R[j][j]."""
    R = _check(R)
    T = len(R)
    if T < 2:
        return 0.0
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))
