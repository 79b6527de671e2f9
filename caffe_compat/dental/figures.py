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
    from caffe_compat.extras import require

    matplotlib = require("matplotlib", "drawing the figures")

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


#: what every figure of half-images must say: right halves are flipped to look like left ones
MIRRORED_NOTE = "right halves are shown mirrored (flipped left-right), as the networks see them"


def plot_reconstructions(
    inputs: np.ndarray,
    recons: np.ndarray,
    path: str,
    names: Sequence[str] = (),
    title: str = "CAE reconstructions of held-out halves",
) -> str:
    """``inputs``, ``recons``: (N, H, W) grey images in [0, 1]; one row per pair, under ``title``
    and the note that right halves are shown mirrored."""
    plt = _plt()
    n = len(inputs)
    fig, axes = plt.subplots(n, 2, figsize=(5, 2.5 * n + 0.8), squeeze=False)
    for i in range(n):
        for j, (img, t) in enumerate(((inputs[i], "(a) input"), (recons[i], "(b) reconstruction"))):
            ax = axes[i, j]
            ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{t} {names[i] if i < len(names) and j == 0 else ''}".strip(), fontsize=7)
            ax.axis("off")
    fig.suptitle(f"{title}\n({MIRRORED_NOTE})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scale_bar(ax, width_px: int, height_px: int, mm_per_px: float) -> None:
    """A white bar of a round number of mm (about a quarter of the image's width), bottom right."""
    if not mm_per_px > 0:
        return
    target = 0.25 * width_px * mm_per_px
    mm = max(v for v in (1, 2, 5, 10, 20, 50, 100) if v <= max(target, 1))
    length = mm / mm_per_px
    x1, y = width_px * 0.95, height_px * 0.93
    ax.plot([x1 - length, x1], [y, y], color="white", linewidth=2.5, solid_capstyle="butt")
    ax.text(x1 - length / 2, y - height_px * 0.02, f"{mm:g} mm", color="white", fontsize=7, ha="center", va="bottom")


def plot_landmarks(
    images: np.ndarray,
    truth: np.ndarray,
    predictions: dict,
    path: str,
    names: Sequence[str] = (),
    title: str = "Held-out halves",
    mm_per_px: Sequence[float] = (),
) -> str:
    """``images`` (N, S, S) grey in [0, 1]; ``truth`` (N, 4, 2) and each of ``predictions``
    ``{approach: (N, 4, 2)}`` in the images' pixel coordinates. Annotated: green circles;
    predicted: red crosses, numbered 1-4. ``title`` (say which configurations are shown) and the
    mirrored-halves note head the figure; ``mm_per_px[i]`` (horizontal mm per displayed pixel of
    image i) draws a scale bar."""
    plt = _plt()
    n, cols = len(images), len(predictions)
    fig, axes = plt.subplots(n, cols, figsize=(3.2 * cols, 3.5 * n + 0.8), squeeze=False)
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
            label = f"({chr(97 + j)}) {approach}"
            if i < len(names):
                label += f"\n{names[i]}"
            ax.set_title(label, fontsize=7)
            if i < len(mm_per_px):
                _scale_bar(ax, images[i].shape[1], images[i].shape[0], float(mm_per_px[i]))
            ax.axis("off")
    axes[0, 0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"{title}\n(scale bars: horizontal mm; {MIRRORED_NOTE})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
