"""Figures people would rather look at than read: t-SNE of embeddings, CL curves and heatmaps."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs write PNGs, never open windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from src.utils.io import atomic_write_bytes  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def tsne_plot(embeddings: np.ndarray, labels: np.ndarray, class_names: list[str], path: str | Path,
              seed: int = 0, title: str = "t-SNE of test embeddings") -> Path:
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(labels) - 1) / 3)))
    xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(embeddings)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10")
    for c in np.unique(labels):
        sel = labels == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=cmap(int(c) % 10), label=class_names[int(c)])
    ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, path)


def accuracy_curve(curves: dict[str, list[float]], path: str | Path, title: str = "Class-IL accuracy on seen classes") -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), [100 * v for v in values], marker="o", label=name)
    ax.set_xticks(range(1, max((len(v) for v in curves.values()), default=1) + 1))
    ax.set_xlabel("after increment")
    ax.set_ylabel("accuracy on all seen classes (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return save_figure(fig, path)


def accuracy_heatmap(matrix: np.ndarray, path: str | Path, title: str = "R[i][j]: accuracy on increment j after training i") -> Path:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    shown = np.ma.masked_invalid(100 * matrix)
    im = ax.imshow(shown, vmin=0, vmax=100, cmap="viridis")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{100 * matrix[i, j]:.0f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xlabel("test increment j")
    ax.set_ylabel("after training increment i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return save_figure(fig, path)


def metric_vs_param(xs: list[float], series: dict[str, list[float]], path: str | Path, xlabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test metric")
    ax.grid(alpha=0.3)
    ax.legend()
    if xs and min(xs) > 0 and max(xs) / min(xs) > 8:
        ax.set_xscale("log", base=2)
    return save_figure(fig, path)
