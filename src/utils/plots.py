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


MARKERS = "o^sDvP*Xph"  # one per cluster within a class; more clusters than markers reuse them


def tsne_plot(embeddings: np.ndarray, labels: np.ndarray, class_names: list[str], path: str | Path,
              seed: int = 0, title: str = "t-SNE of test embeddings", clusters: np.ndarray | None = None) -> Path:
    """Colour: class. With ``clusters`` (each point's cluster within its class, 0..K-1) the marker shows the
    cluster, and the legend lists the markers."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(labels) - 1) / 3)))
    xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(embeddings)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10")
    ranks = np.zeros(len(labels), dtype=int) if clusters is None else np.asarray(clusters, dtype=int)
    for c in np.unique(labels):
        for r in np.unique(ranks[labels == c]):
            sel = (labels == c) & (ranks == r)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=8, color=cmap(int(c) % 10), marker=MARKERS[int(r) % len(MARKERS)],
                       label=class_names[int(c)] if r == ranks[labels == c].min() else None)
    handles, names = ax.get_legend_handles_labels()
    if clusters is not None:
        from matplotlib.lines import Line2D

        handles += [Line2D([], [], color="grey", marker=MARKERS[r % len(MARKERS)], linestyle="")
                    for r in range(int(ranks.max()) + 1)]
        names += [f"cluster {r + 1} of its class" for r in range(int(ranks.max()) + 1)]
    ax.legend(handles, names, markerscale=2, fontsize=7, loc="best")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, path)


def attribute_concentration_plot(ks: list[int], curves: dict[str, list[float]], path: str | Path,
                                 title: str = "Attribute concentration") -> Path:
    """The seed paper's attribute-concentration figure: for each neighbourhood size k, the mean fraction of an
    image's k nearest neighbours that share each of its class's attributes."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        ax.plot(ks, values, marker="o", label=name)
    ax.set_xlabel("neighbourhood size k")
    ax.set_ylabel("attribute concentration")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
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
