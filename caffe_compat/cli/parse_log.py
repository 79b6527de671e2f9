"""Turn a ``caffe train`` log into two CSV files, as Caffe's ``tools/extra/parse_log.py``.

    python tools/parse_log.py LOGFILE OUTPUT_DIR [--delimiter ,] [--verbose]
    python tools/parse_log.py LOGFILE [OUTPUT_DIR] --plot curves.png


Writes ``OUTPUT_DIR/<log name>.train`` and ``OUTPUT_DIR/<log name>.test``: one row per iteration
that printed net outputs, with the columns ``NumIters``, ``Seconds`` (since the ``Solving`` line),
``LearningRate`` and one per output (``loss``, ``accuracy``, ...). Reads logs of real Caffe (glog's
``mmdd`` and newer ``yyyymmdd`` dates) and of ``tools/train.py``. ``--plot FILE`` also draws the
curves Caffe's ``tools/extra/plot_training_log.py`` drew, in one picture (the ``[paper]`` extra,
matplotlib): the losses, the accuracies and the learning rate against the iteration, train and
test (test points marked). Errors print one line and exit with status 1.
"""

from __future__ import annotations

import logging
import os
import sys

from caffe_compat.cli._common import ArgumentParser, UsageError, exits_130_on_interrupt, report_error
from caffe_compat.errors import CaffeError
from caffe_compat.solvers.log import parse_log, setup_logging, write_log_csv

__all__ = ["main", "build_parser", "draw_curves", "plot_curves"]

log = logging.getLogger("caffe_compat")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="parse_log.py", description="Parse a Caffe training log into train and test CSV files.")
    p.add_argument("logfile_path", help="the log (caffe train's or tools/train.py's stderr)")
    p.add_argument(
        "output_dir", nargs="?", default="", help="where to write <log name>.train and <log name>.test (CSV)"
    )
    p.add_argument("--plot", default="", help="also draw loss / accuracy / learning rate vs iteration into this image")
    p.add_argument("--delimiter", default=",", help="column delimiter in the CSV files (',')")
    p.add_argument("--verbose", action="store_true", help="print the names of the files written")
    return p


_COLUMNS = ("NumIters", "Seconds", "LearningRate")


def _series(rows: list[dict], name: str) -> tuple[list[float], list[float]]:
    pts = [(r["NumIters"], r[name]) for r in rows if name in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(train: list[dict], test: list[dict], path: str, title: str = "") -> str:
    """Rows of :func:`~caffe_compat.solvers.log.parse_log` as one picture (:func:`draw_curves`),
    saved to ``path`` (the file type follows its suffix)."""
    import matplotlib.pyplot as plt

    fig = draw_curves(train, test, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_curves(train: list[dict], test: list[dict], title: str = ""):
    """A matplotlib figure of three panels against the iteration: the outputs whose name has
    ``acc`` (accuracies), the other outputs (losses), each train (lines) and test (marked points),
    and the train rows' learning rate."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names: dict[str, None] = {}
    for row in (*train, *test):
        names.update(dict.fromkeys(k for k in row if k not in _COLUMNS))
    accuracies = [n for n in names if "acc" in n.lower()]
    losses = [n for n in names if n not in accuracies]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, group, ylabel in ((axes[0], losses, "loss"), (axes[1], accuracies, "accuracy")):
        for phase, rows, style in (("train", train, dict(linewidth=1)), ("test", test, dict(marker="o", markersize=3))):
            for name in group:
                x, y = _series(rows, name)
                if x:
                    ax.plot(x, y, label=f"{phase} {name}", **style)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no {ylabel} output in this log", ha="center", va="center", transform=ax.transAxes)
    x = [r["NumIters"] for r in train]
    axes[2].plot(x, [r["LearningRate"] for r in train], label="learning rate", drawstyle="steps-post")
    axes[2].set_xlabel("iteration")
    axes[2].set_ylabel("learning rate")
    axes[2].grid(True, alpha=0.3)
    fig.suptitle(f"Training log {title}".strip())
    fig.tight_layout()
    return fig


@exits_130_on_interrupt("parse_log.py")
def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        setup_logging(program="parse_log")
        if not os.path.isfile(args.logfile_path):
            raise UsageError(f"{args.logfile_path}: no such log file")
        if not args.output_dir and not args.plot:
            raise UsageError("give an OUTPUT_DIR for the CSV files, --plot curves.png, or both")
        if args.output_dir and not os.path.isdir(args.output_dir):
            raise UsageError(f"{args.output_dir}: no such directory; create it first")
        if len(args.delimiter) != 1:
            raise UsageError(f"--delimiter {args.delimiter!r}: give one character")
        train, test = parse_log(args.logfile_path)
        if not train and not test:
            log.warning(
                "%s: no 'Train net output' or 'Test net output' lines after an 'Iteration' line", args.logfile_path
            )
        if args.plot:
            from caffe_compat.extras import require

            require("matplotlib", "parse_log.py --plot")
        base = os.path.basename(args.logfile_path)
        for suffix, rows in ((".train", train), (".test", test)) if args.output_dir else ():
            path = os.path.join(args.output_dir, base + suffix)
            write_log_csv(path, rows, args.delimiter)
            if args.verbose:
                log.info("Wrote %s (%d rows)", path, len(rows))
        if args.plot:
            plot_curves(train, test, args.plot, title=base)
            print(f"wrote {args.plot}")
        return 0
    except (CaffeError, OSError) as e:
        return report_error("parse_log.py", e)


if __name__ == "__main__":
    sys.exit(main())
