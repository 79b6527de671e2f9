"""Turn a ``caffe train`` log into two CSV files, as Caffe's ``tools/extra/parse_log.py``.

    python tools/parse_log.py LOGFILE OUTPUT_DIR [--delimiter ,] [--verbose]

Writes ``OUTPUT_DIR/<log name>.train`` and ``OUTPUT_DIR/<log name>.test``: one row per iteration
that printed net outputs, with the columns ``NumIters``, ``Seconds`` (since the ``Solving`` line),
``LearningRate`` and one per output (``loss``, ``accuracy``, ...). Reads logs of real Caffe (glog's
``mmdd`` and newer ``yyyymmdd`` dates) and of ``tools/train.py``. Errors print one line and exit
with status 1.
"""

from __future__ import annotations

import logging
import os
import sys

from caffe_compat.cli._common import ArgumentParser, UsageError, exits_130_on_interrupt, report_error
from caffe_compat.errors import CaffeError
from caffe_compat.solvers.log import parse_log, setup_logging, write_log_csv

__all__ = ["main", "build_parser"]

log = logging.getLogger("caffe_compat")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="parse_log.py", description="Parse a Caffe training log into train and test CSV files.")
    p.add_argument("logfile_path", help="the log (caffe train's or tools/train.py's stderr)")
    p.add_argument("output_dir", help="where to write <log name>.train and <log name>.test")
    p.add_argument("--delimiter", default=",", help="column delimiter in the CSV files (',')")
    p.add_argument("--verbose", action="store_true", help="print the names of the files written")
    return p


@exits_130_on_interrupt("parse_log.py")
def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        setup_logging(program="parse_log")
        if not os.path.isfile(args.logfile_path):
            raise UsageError(f"{args.logfile_path}: no such log file")
        if not os.path.isdir(args.output_dir):
            raise UsageError(f"{args.output_dir}: no such directory; create it first")
        if len(args.delimiter) != 1:
            raise UsageError(f"--delimiter {args.delimiter!r}: give one character")
        train, test = parse_log(args.logfile_path)
        if not train and not test:
            log.warning(
                "%s: no 'Train net output' or 'Test net output' lines after an 'Iteration' line", args.logfile_path
            )
        base = os.path.basename(args.logfile_path)
        for suffix, rows in ((".train", train), (".test", test)):
            path = os.path.join(args.output_dir, base + suffix)
            write_log_csv(path, rows, args.delimiter)
            if args.verbose:
                log.info("Wrote %s (%d rows)", path, len(rows))
        return 0
    except (CaffeError, OSError) as e:
        return report_error("parse_log.py", e)


if __name__ == "__main__":
    sys.exit(main())
