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
import logging
import os
import sys
import time

import numpy as np

__all__ = ["logger", "fmt", "GlogFormatter", "setup_logging", "progress_bar"]

logger = logging.getLogger("caffe_compat")

_LEVEL_CHAR = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E", logging.CRITICAL: "F"}
_GLOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}


def fmt(x) -> str:
    """A number as C++'s ``ostream << x`` prints it (precision 6, like ``%g``)."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    return format(float(x), "g")


class GlogFormatter(logging.Formatter):
    """``Lmmdd hh:mm:ss.uuuuuu pid file:line] message``, as glog prefixes Caffe's lines."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created - int(record.created)) * 1e6)
        prefix = (
            f"{_LEVEL_CHAR.get(record.levelno, 'I')}{t.tm_mon:02d}{t.tm_mday:02d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{micros:06d} {record.process} "
            f"{record.filename}:{record.lineno}] "
        )
        msg = record.getMessage()
        if record.exc_info:
            msg = msg + "\n" + self.formatException(record.exc_info)
        return prefix + msg


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


def setup_logging(stream=None) -> logging.Handler:
    """Send the ``caffe_compat`` logger to ``stream`` (stderr) in glog's format; returns the handler.

    Replaces a handler installed by an earlier call, so tools called repeatedly in one process
    (tests) do not print each line several times.
    """
    level = _GLOG_LEVELS.get(int(os.environ.get("GLOG_minloglevel", "0") or 0), logging.INFO)
    for h in list(logger.handlers):
        if getattr(h, "_caffe_compat_glog", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(GlogFormatter())
    handler._caffe_compat_glog = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


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
