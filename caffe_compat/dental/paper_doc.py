"""docs/paper.md's Table II, written from a run folder (``tools/reproduce_paper.py --write-doc``).

The page holds the table between two marker lines; :func:`write_doc` replaces what is between
them with the run's ``table2.json`` and ``summary.json`` (preset, seed, wall-clock time, machine),
so the page shows what the current code computes, never numbers copied by hand.
"""

from __future__ import annotations

import json
import os
import platform

from caffe_compat.dental import evaluate
from caffe_compat.errors import CaffeError

__all__ = ["BEGIN", "END", "doc_table", "write_doc"]

BEGIN = "<!-- table2:begin (tools/reproduce_paper.py --write-doc writes this part; do not edit it by hand) -->"
END = "<!-- table2:end -->"


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU threads, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def doc_table(run_dir: str, machine: str | None = None) -> str:
    """The markdown of the run's Table II with where and how it was made."""
    try:
        with open(os.path.join(run_dir, "table2.json"), encoding="utf-8") as f:
            table = json.load(f)
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        raise CaffeError(f"{run_dir}: not a finished reproduce_paper run folder ({e})") from None
    seconds = float(summary.get("seconds", 0.0))
    preset = summary["preset"]["name"]
    n = table["rows"][0]["n"] if table["rows"] else 0
    lines = [
        f"Run `{os.path.basename(run_dir)}`: preset `{preset}`, seed {summary.get('seed', 0)}, "
        f"{int(seconds // 60)} min {int(seconds % 60):02d} s wall-clock on {machine or _machine()}. "
        f"mm, mean ± std over the {n} held-out halves:",
        "",
        "| configuration | landmark 1 | landmark 2 | landmark 3 | landmark 4 | mean | CAE gain | vs. mean predictor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table["rows"]:
        cells = " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in zip(r["mean"], r["std"]))
        gain = "" if r["cae_gain"] is None else f"{100 * r['cae_gain']:.1f}%"
        ref = (
            ""
            if r["config"] == evaluate.MEAN_PREDICTOR[0] or r["vs_mean_predictor"] is None
            else (f"{100 * r['vs_mean_predictor']:.1f}%")
        )
        lines.append(f"| {r['label']} | {cells} | {r['mean_over_landmarks']:.4f} | {gain} | {ref} |")
    losses = summary.get("final_train_loss", {})
    if losses:
        lines += ["", "Final training losses: " + ", ".join(f"{k} {v:.4g}" for k, v in losses.items()) + "."]
    cae = [note for note in table.get("notes", []) if note.startswith("CAE validation loss")]
    if cae:
        lines += ["", cae[0] + "."]
    return "\n".join(lines)


def write_doc(run_dir: str, page: str, machine: str | None = None) -> None:
    """Replace the part of ``page`` between :data:`BEGIN` and :data:`END` by :func:`doc_table`."""
    with open(page, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise CaffeError(
            f"{page}: the Table II markers are missing; put these two lines where it goes:\n{BEGIN}\n{END}"
        )
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{doc_table(run_dir, machine)}\n{END}{tail}"
    tmp = page + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, page)
