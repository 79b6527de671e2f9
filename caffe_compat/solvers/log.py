"""Logging in Caffe's format: glog's line prefix for the tools, a progress bar on terminals.

The library logs through the ``logging`` logger ``"caffe_compat"`` only; the text after glog's
prefix is Caffe's own (``Iteration 10, loss = 0.5``...). Numbers are printed as C++'s default
``ostream`` does (6 significant digits, ``%g``), see :func:`fmt`.

``setup_logging()`` (used by ``tools/``) installs a handler on stderr whose lines look like
glog's: ``I1126 22:35:47.814251 15370 base.py:231] Iteration 0, loss = 1.38919``. It honours
``GLOG_minloglevel`` (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL) as Caffe's tools do.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import logging
import math
import os
import re
import sys
import time

from caffe_compat._glog import GlogFormatter
from caffe_compat.logfmt import fmt

__all__ = ["logger", "fmt", "GlogFormatter", "setup_logging", "progress_bar", "parse_log", "write_log_csv"]

logger = logging.getLogger("caffe_compat")

_GLOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (tests swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(stream=None, program: str = "caffe") -> logging.Handler:
    """Send the ``caffe_compat`` logger to ``stream`` (stderr) in glog's format; returns the handler.

    With ``GLOG_log_dir`` set (as for Caffe's tools, which log to files and to stderr), the lines
    also go to glog's files in that folder: ``<program>.<host>.<user>.log.<LEVEL>.<yyyymmdd-hhmmss>.<pid>``
    for INFO (every line), WARNING and ERROR (those levels and above), each starting with glog's
    header, and the links ``<program>.INFO`` / ``.WARNING`` / ``.ERROR`` to the newest ones (the
    ``caffe.INFO`` that scripts and ``tools/parse_log.py`` read). Caffe's default of writing them
    to /tmp when the variable is unset is not followed: no files without it.

    Replaces the handlers installed by an earlier call, so tools called repeatedly in one process
    (tests) do not print each line several times.
    """
    level = _GLOG_LEVELS.get(int(os.environ.get("GLOG_minloglevel", "0") or 0), logging.INFO)
    for h in list(logger.handlers):
        if getattr(h, "_caffe_compat_glog", False):
            logger.removeHandler(h)
            if isinstance(h, logging.FileHandler):
                h.close()
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(GlogFormatter())
    handler._caffe_compat_glog = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    log_dir = os.environ.get("GLOG_log_dir", "")
    if log_dir:
        for f in _glog_files(log_dir, program):
            logger.addHandler(f)
    logger.setLevel(level)
    logger.propagate = False
    return handler


def _glog_files(log_dir: str, program: str) -> list[logging.Handler]:
    """glog's per-level log files in ``log_dir`` (see ``setup_logging``)."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name: glog writes "invalid-user"
        user = "invalid-user"
    host = socket.gethostname() or "localhost"
    now = time.localtime()
    stamp = time.strftime("%Y%m%d-%H%M%S", now)
    os.makedirs(log_dir, exist_ok=True)
    handlers = []
    for name, level in (("INFO", logging.INFO), ("WARNING", logging.WARNING), ("ERROR", logging.ERROR)):
        base = f"{program}.{host}.{user}.log.{name}.{stamp}.{os.getpid()}"
        path = os.path.join(log_dir, base)
        h = logging.FileHandler(path, encoding="utf-8")
        h.stream.write(
            f"Log file created at: {time.strftime('%Y/%m/%d %H:%M:%S', now)}\n"
            f"Running on machine: {host}\n"
            "Log line format: [IWEF]mmdd hh:mm:ss.uuuuuu threadid file:line] msg\n"
        )
        h.setLevel(level)
        h.setFormatter(GlogFormatter())
        h._caffe_compat_glog = True  # type: ignore[attr-defined]
        handlers.append(h)
        link = os.path.join(log_dir, f"{program}.{name}")
        tmp = f"{link}.{os.getpid()}.tmp"
        try:  # replace the link atomically, as glog points it at the newest file
            if os.path.lexists(tmp):
                os.remove(tmp)
            os.symlink(base, tmp)
            os.replace(tmp, link)
        except OSError:  # no symlinks here (some file systems): the dated files are still there
            pass
    return handlers


@contextlib.contextmanager
def progress_bar(total: int, initial: int = 0, desc: str = "train"):
    """A tqdm bar on stderr while it is a terminal; ``None`` otherwise (logs, pipes, tests).

    While the bar is shown, log lines are written through tqdm so that they do not break it.
    """
    if total <= 0 or not hasattr(sys.stderr, "isatty") or not sys.stderr.isatty():
        yield None
        return
    try:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # pragma: no cover
        yield None
        return
    with tqdm(total=total, initial=initial, desc=desc, unit="iter", leave=False, file=sys.stderr) as bar:
        with logging_redirect_tqdm(loggers=[logger]):
            yield bar


# -- reading a training log back (Caffe's tools/extra/parse_log.py) -----------------------------

# glog's prefix: level, date as mmdd (glog < 0.6) or yyyymmdd (newer glog), time with microseconds
_GLOG_PREFIX = re.compile(r"^[IWEF](\d{8}|\d{4}) (\d\d):(\d\d):(\d\d)\.(\d{6}) ")
_ITERATION = re.compile(r"Iteration (\d+)")
# Caffe's regexes accept digits, '.', 'e', 'E', '+', '-'; here also nan and inf (a diverged run)
_NUMBER = r"([-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan|inf))"
_OUTPUT = {
    "train": re.compile(r"Train net output #(\d+): (\S+) = " + _NUMBER),
    "test": re.compile(r"Test net output #(\d+): (\S+) = " + _NUMBER),
}
_LEARNING_RATE = re.compile(r"lr = " + _NUMBER)


class _Clock:
    """glog timestamps to datetimes. Lines with a 4-digit date carry no year: it is the log file's
    year (its change time, as Caffe's extract_seconds), advanced when the month goes backwards
    (a run across New Year)."""

    def __init__(self, year: int):
        self.year, self.month = year, 0

    def __call__(self, line: str) -> datetime.datetime | None:
        m = _GLOG_PREFIX.match(line)
        if m is None:
            return None
        date, hh, mm, ss, us = m.groups()
        if len(date) == 8:
            year, month, day = int(date[:4]), int(date[4:6]), int(date[6:])
        else:
            month, day = int(date[:2]), int(date[2:])
            if month < self.month:
                self.year += 1
            year = self.year
        self.month = month
        try:
            return datetime.datetime(year, month, day, int(hh), int(mm), int(ss), int(us))
        except ValueError:
            return None


def parse_log(path: str) -> tuple[list[dict], list[dict]]:
    """The training and test rows of a ``caffe train`` log (Caffe's or ours), as Caffe's
    ``tools/extra/parse_log.py``: one row per iteration that printed ``Train net output`` /
    ``Test net output`` lines, with ``NumIters``, ``Seconds`` (since the ``Solving`` line),
    ``LearningRate`` (the last ``lr = `` printed; the first row takes the second row's, as Caffe)
    and one column per output name, in order of appearance.

    Differences from Caffe's script, all on inputs it fails on: glog's newer ``yyyymmdd`` dates
    are read (its script only reads ``mmdd``), ``nan``/``inf`` values are kept, the last row is kept
    even when it is the only one, and lines without a glog prefix (a solver's parameters printed
    over several lines) are skipped instead of ending the run."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    clock = _Clock(datetime.datetime.fromtimestamp(os.path.getctime(path)).year)
    start = None
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    current: dict[str, dict | None] = {"train": None, "test": None}
    iteration, lr = -1, math.nan
    for line in lines:
        stamp = clock(line)
        if start is None and stamp is not None and "Solving" in line:
            start = stamp
        m = _ITERATION.search(line)
        if m:
            iteration = float(m.group(1))  # a float, as Caffe's script writes it (0.0, 2.0, ...)
        if iteration == -1:
            continue
        m = _LEARNING_RATE.search(line)
        if m:
            lr = float(m.group(1))
        for kind, regex in _OUTPUT.items():
            m = regex.search(line)
            if m is None:
                continue
            row = current[kind]
            if row is None or row["NumIters"] != iteration:
                if row is not None:
                    rows[kind].append(row)
                seconds = (stamp - start).total_seconds() if stamp is not None and start is not None else math.nan
                row = current[kind] = {"NumIters": iteration, "Seconds": seconds, "LearningRate": lr}
            row[m.group(2)] = float(m.group(3))
    for kind, row in current.items():
        if row is not None:
            rows[kind].append(row)
    for table in rows.values():
        if len(table) > 1:
            table[0]["LearningRate"] = table[1]["LearningRate"]
    return rows["train"], rows["test"]


def write_log_csv(path: str, rows: list[dict], delimiter: str = ",") -> None:
    """``rows`` (from :func:`parse_log`) as a CSV file with a header line; the columns are the union
    of the rows' keys in order of appearance (an output missing from a row is left empty)."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(names), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
