"""The paper's error measure and Table II.

Error of one landmark of one half-image = Euclidean distance, in mm, between the predicted and the
annotated positions, after mapping the normalised predictions back to the original image's pixels
(``(u, v) × (half width, image height)``) and multiplying by the pixel spacing. Per landmark:
the mean and the standard deviation (population, ``ddof=0``; the paper does not say which) over
the held-out halves.

Table rows, as in the paper's Table II: ``{no CAE, CAE} × {fc6 frozen, fc6 fine-tuned}``. The
"relative gain of CAE" of a row is ``1 - mean(CAE) / mean(no CAE)`` for the same fc6 setting,
with mean = the mean of the four landmarks' mean errors (the paper's 5.374 mm). A reference row
(not in the paper) gives the error of the mean-landmark predictor; where it is present, every row
also carries ``vs_mean_predictor = 1 - mean(row) / mean(reference)``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

import numpy as np

__all__ = [
    "CONFIGS",
    "MEAN_PREDICTOR",
    "PAPER_TABLE",
    "mean_predictor",
    "landmark_errors_mm",
    "summarize",
    "table_rows",
    "write_table",
]

#: configuration key -> (uses the CAE, fc6 fine-tuned, the paper's row label)
CONFIGS = {
    "nocae_fc6_frozen": (False, False, "w/o unsupervised fine-tuning, fc6 frozen"),
    "nocae_fc6_finetuned": (False, True, "w/o unsupervised fine-tuning, fc6 fine-tuned"),
    "cae_fc6_frozen": (True, False, "with unsupervised (CAE) fine-tuning, fc6 frozen"),
    "cae_fc6_finetuned": (True, True, "with unsupervised (CAE) fine-tuning, fc6 fine-tuned"),
}

#: The reference row: every held-out half gets the mean of the training halves' landmarks (no
#: image is looked at). A regressor that does not beat it has learnt nothing from the images.
MEAN_PREDICTOR = ("mean_predictor", "reference: mean training landmarks (ignores the image)")

#: The paper's Table II (mm): configuration -> [(mean, std) for landmarks 1-4]
PAPER_TABLE = {
    "nocae_fc6_frozen": [(7.3520, 3.4258), (8.6705, 5.3689), (8.3074, 4.3578), (7.4930, 4.0606)],
    "nocae_fc6_finetuned": [(6.6244, 2.9509), (8.0094, 5.4466), (7.6486, 4.6781), (6.9465, 3.5296)],
    "cae_fc6_frozen": [(5.0618, 2.8706), (6.9777, 5.8913), (6.6981, 4.9015), (5.0999, 2.3172)],
    "cae_fc6_finetuned": [(4.2447, 3.1350), (6.7628, 5.5224), (6.6757, 4.9623), (3.9234, 1.9063)],
}


def landmark_errors_mm(predictions: np.ndarray, halves: Sequence[dict]) -> np.ndarray:
    """Distances (N, 4) in mm between predicted and annotated landmarks.

    ``predictions`` (N, 8): the regressor's outputs (u1, v1, ..., u4, v4) for the halves described
    by ``halves`` (rows of ``halves.csv``, in the same order: ``side``, ``image_width``,
    ``image_height``, ``half_width``, ``spacing_mm`` and the annotated ``x1..y4`` in image pixels).
    """
    from caffe_compat.dental.dataset import to_image_pixels

    pred = np.asarray(predictions, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] != 8:
        raise ValueError(f"predictions must have shape (N, 8), got {pred.shape}")
    if len(halves) != pred.shape[0]:
        raise ValueError(f"{pred.shape[0]} predictions for {len(halves)} halves")
    out = np.zeros((pred.shape[0], 4))
    for i, row in enumerate(halves):
        px = to_image_pixels(
            pred[i].reshape(4, 2),
            row["side"],
            int(row["image_width"]),
            int(row["image_height"]),
            int(row["half_width"]),
        )
        truth = np.array([[float(row[f"x{k}"]), float(row[f"y{k}"])] for k in range(1, 5)])
        out[i] = np.hypot(*(px - truth).T) * float(row["spacing_mm"])
    return out


def mean_predictor(train_targets: np.ndarray, n: int) -> np.ndarray:
    """The reference predictions (n, 8): the mean of ``train_targets`` (M, 8) for every half."""
    t = np.asarray(train_targets, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] != 8 or len(t) == 0:
        raise ValueError(f"train_targets must have shape (M, 8) with M > 0, got {t.shape}")
    return np.repeat(t.mean(axis=0, keepdims=True), n, axis=0)


def summarize(errors_mm: np.ndarray) -> dict:
    """Per landmark mean and std (mm), and the mean over landmarks of the means."""
    e = np.asarray(errors_mm, dtype=np.float64)
    means = e.mean(axis=0)
    stds = e.std(axis=0)
    return {
        "mean": [float(v) for v in means],
        "std": [float(v) for v in stds],
        "mean_over_landmarks": float(means.mean()),
        "n": int(e.shape[0]),
    }


def table_rows(results: dict) -> list[dict]:
    """Rows of Table II from ``{config: summarize(...)}`` (configs missing from ``results`` are
    skipped), each with its relative CAE gain where both members of the pair are present; the
    :data:`MEAN_PREDICTOR` reference row first when ``results`` has it."""
    rows = []
    key, label = MEAN_PREDICTOR
    if key in results:
        r = results[key]
        rows.append(
            {
                "config": key,
                "label": label,
                "cae": False,
                "fc6_finetuned": False,
                "mean": r["mean"],
                "std": r["std"],
                "mean_over_landmarks": r["mean_over_landmarks"],
                "cae_gain": None,
                "n": r["n"],
            }
        )
    for key, (cae, finetuned, label) in CONFIGS.items():
        if key not in results:
            continue
        r = results[key]
        gain = None
        if cae:
            base = "nocae_fc6_finetuned" if finetuned else "nocae_fc6_frozen"
            if base in results and results[base]["mean_over_landmarks"] > 0:
                gain = 1.0 - r["mean_over_landmarks"] / results[base]["mean_over_landmarks"]
        rows.append(
            {
                "config": key,
                "label": label,
                "cae": cae,
                "fc6_finetuned": finetuned,
                "mean": r["mean"],
                "std": r["std"],
                "mean_over_landmarks": r["mean_over_landmarks"],
                "cae_gain": gain,
                "n": r["n"],
            }
        )
    ref = results.get(MEAN_PREDICTOR[0])
    for r in rows:
        r["vs_mean_predictor"] = None
        if ref is not None and ref["mean_over_landmarks"] > 0:
            r["vs_mean_predictor"] = 1.0 - r["mean_over_landmarks"] / ref["mean_over_landmarks"]
    return rows


def write_table(results: dict, out_dir: str, notes: Sequence[str] = ()) -> dict:
    """Write Table II as ``table2.md``, ``table2.csv`` and ``table2.json`` in ``out_dir``;
    returns ``{"md": path, "csv": path, "json": path}``."""
    rows = table_rows(results)
    paths = {ext: os.path.join(out_dir, f"table2.{ext}") for ext in ("md", "csv", "json")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(
            {"rows": rows, "notes": list(notes), "paper": PAPER_TABLE, "units": "mm", "std": "population (ddof=0)"},
            f,
            indent=2,
        )
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "config",
                "cae",
                "fc6_finetuned",
                *[f"landmark{k}_{s}" for k in range(1, 5) for s in ("mean_mm", "std_mm")],
                "mean_over_landmarks_mm",
                "cae_gain",
                "n_halves",
            ]
        )
        for r in rows:
            vals = [f"{v:.4f}" for k in range(4) for v in (r["mean"][k], r["std"][k])]
            w.writerow(
                [
                    r["config"],
                    int(r["cae"]),
                    int(r["fc6_finetuned"]),
                    *vals,
                    f"{r['mean_over_landmarks']:.4f}",
                    "" if r["cae_gain"] is None else f"{r['cae_gain']:.4f}",
                    r["n"],
                ]
            )
    lines = ["# Table II: detection error (mm, mean ± std over the held-out halves)", ""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    has_ref = any(r["vs_mean_predictor"] is not None for r in rows)
    lines.append(
        "| configuration | landmark 1 | landmark 2 | landmark 3 | landmark 4 | mean | CAE gain |"
        + (" vs. mean predictor |" if has_ref else "")
    )
    lines.append("|---|---|---|---|---|---|---|" + ("---|" if has_ref else ""))
    for r in rows:
        cells = [f"{r['mean'][k]:.4f} ± {r['std'][k]:.4f}" for k in range(4)]
        gain = "" if r["cae_gain"] is None else f"{100 * r['cae_gain']:.1f}%"
        ref = ""
        if has_ref and r["config"] != MEAN_PREDICTOR[0]:
            ref = f" {100 * r['vs_mean_predictor']:.1f}% |"
        elif has_ref:
            ref = " |"
        lines.append(f"| {r['label']} | {' | '.join(cells)} | {r['mean_over_landmarks']:.4f} | {gain} |{ref}")
    lines += [
        "",
        "The paper's Table II, for comparison:",
        "",
        "| configuration | landmark 1 | landmark 2 | landmark 3 | landmark 4 | mean |",
        "|---|---|---|---|---|---|",
    ]
    for key, vals in PAPER_TABLE.items():
        cells = [f"{m:.4f} ± {s:.4f}" for m, s in vals]
        lines.append(f"| {CONFIGS[key][2]} | {' | '.join(cells)} | {np.mean([m for m, _ in vals]):.4f} |")
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return paths
