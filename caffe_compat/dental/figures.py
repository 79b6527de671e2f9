"""The paper's figures, as PNG files (matplotlib, Agg backend).

- :func:`plot_learning_curves` — Fig. 7/9: train and validation loss per iteration, one line per
  configuration.
- :func:`plot_reconstructions` — Fig. 5/6: CAE input and reconstruction pairs.
- :func:`plot_landmarks` — Fig. 8: annotated vs predicted landmarks on held-out half-images, one
  column per approach.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["plot_landmarks", "plot_learning_curves", "plot_reconstructions"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(
    curves: dict, path: str, title: str = "Learning curves", references: dict | None = None
) -> str:
    """``curves``: ``{label: {"train": [(iter, loss)...], "val": [(iter, loss)...]}}``;
    ``references``: ``{label: validation loss}`` drawn as dashed horizontal lines on the validation
    panel (e.g. the loss of the mean predictor)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, value in (references or {}).items():
        axes[1].axhline(float(value), color="gray", linestyle="--", linewidth=1, label=label)
    for label, c in curves.items():
        for ax, key in zip(axes, ("train", "val")):
            pts = np.asarray(c.get(key) or [], dtype=np.float64).reshape(-1, 2)
            if len(pts):
                ax.plot(
                    pts[:, 0],
                    pts[:, 1],
                    label=label,
                    marker="o" if key == "val" and len(pts) < 30 else None,
                    markersize=3,
                )
    for ax, name in zip(axes, ("(a) Train", "(b) Validation")):
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reconstructions(inputs: np.ndarray, recons: np.ndarray, path: str, names: Sequence[str] = ()) -> str:
    """``inputs``, ``recons``: (N, H, W) grey images in [0, 1]; one row per pair."""
    plt = _plt()
    n = len(inputs)
    fig, axes = plt.subplots(n, 2, figsize=(5, 2.5 * n), squeeze=False)
    for i in range(n):
        for j, (img, t) in enumerate(((inputs[i], "(a) input"), (recons[i], "(b) reconstruction"))):
            ax = axes[i, j]
            ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{t} {names[i] if i < len(names) and j == 0 else ''}".strip(), fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_landmarks(
    images: np.ndarray, truth: np.ndarray, predictions: dict, path: str, names: Sequence[str] = ()
) -> str:
    """``images`` (N, S, S) grey in [0, 1]; ``truth`` (N, 4, 2) and each of ``predictions``
    ``{approach: (N, 4, 2)}`` in the images' pixel coordinates. Annotated: green circles;
    predicted: red crosses, numbered 1-4."""
    plt = _plt()
    n, cols = len(images), len(predictions)
    fig, axes = plt.subplots(n, cols, figsize=(3.2 * cols, 3.2 * n), squeeze=False)
    for j, (approach, pred) in enumerate(predictions.items()):
        for i in range(n):
            ax = axes[i, j]
            ax.imshow(np.clip(images[i], 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.scatter(truth[i, :, 0], truth[i, :, 1], s=30, facecolors="none", edgecolors="lime", label="annotated")
            ax.scatter(pred[i, :, 0], pred[i, :, 1], s=30, marker="x", c="red", label="predicted")
            for k in range(4):
                ax.annotate(
                    str(k + 1),
                    (pred[i, k, 0], pred[i, k, 1]),
                    color="yellow",
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            title = f"({chr(97 + j)}) {approach}"
            if i < len(names):
                title += f"\n{names[i]}"
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    axes[0, 0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
