"""pycaffe's log without ``init_log()``: Caffe's lines on stderr, in glog's format.

pycaffe's Caffe logs through glog, which writes to stderr before ``InitGoogleLogging`` is called:
a pycaffe script sees ``Iteration 100, loss = 0.3`` from ``solver.step()`` without setting
anything up. caffe_compat logs through the ``logging`` logger ``"caffe_compat"``, whose INFO
lines Python drops by default; ``install_default_handler()`` gives the pycaffe-facing API
glog's behaviour:

- a handler on ``"caffe_compat"`` that writes each record to the current ``sys.stderr`` in
  glog's format (``GlogFormatter``), and stays silent for a record that another
  handler prints (one the application put on the logger, on a ``caffe_compat.*`` child, or,
  while the logger propagates, on the root logger: ``logging.basicConfig``, ``caffe.init_log()``,
  pytest's capture), so no line is printed twice;
- the logger's level from ``GLOG_minloglevel`` (0 INFO, the default; 1 WARNING; 2 ERROR;
  3 FATAL), as glog reads it, set only when the application has not configured logging (the
  logger has no level of its own and the root logger no handler).

The handler carries the mark of ``solvers.log.setup_logging`` handlers, so the tools'
``setup_logging()`` replaces it instead of adding a second stderr handler. It is installed by
``caffe_compat.install_as_caffe()`` (``import caffe`` through caffe_compat, ``python -m
caffe_compat run``); calling it again does nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time

__all__ = ["DefaultStderrHandler", "GlogFormatter", "install_default_handler", "LOGGER_NAME"]

LOGGER_NAME = "caffe_compat"
#: The attribute by which ``solvers.log.setup_logging`` recognises (and replaces) its handlers.
_MARK = "_caffe_compat_glog"
_GLOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}


def _glog_level() -> int:
    raw = os.environ.get("GLOG_minloglevel", "0").strip() or "0"
    try:
        return _GLOG_LEVELS.get(int(raw), logging.CRITICAL if int(raw) > 3 else logging.INFO)
    except ValueError:
        return logging.INFO


_LEVEL_CHAR = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E", logging.CRITICAL: "F"}


class GlogFormatter(logging.Formatter):
    """``Lmmdd hh:mm:ss.uuuuuu pid file:line] message``, as glog prefixes Caffe's lines (here, not
    in ``solvers.log``, so that the pycaffe alias does not import the solvers)."""

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


class DefaultStderrHandler(logging.Handler):
    """Writes records to the current ``sys.stderr`` in glog's format, unless another handler
    on the record's way up the logger hierarchy will print it."""

    def __init__(self):
        super().__init__()
        self.setFormatter(GlogFormatter())
        setattr(self, _MARK, True)

    def _printed_elsewhere(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return True
            if not logger.propagate:
                return False
            logger = logger.parent
        return False

    def emit(self, record: logging.LogRecord) -> None:
        if self._printed_elsewhere(record):
            return
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own rule: report, never raise
            self.handleError(record)


def install_default_handler() -> bool:
    """Give the ``caffe_compat`` logger glog's default (see the module docstring). Returns True
    when it installed the handler, False when one was there already (this one, or the tools'
    ``setup_logging``)."""
    logger = logging.getLogger(LOGGER_NAME)
    if any(getattr(h, _MARK, False) for h in logger.handlers):
        return False
    logger.addHandler(DefaultStderrHandler())
    if logger.level == logging.NOTSET and not logging.getLogger().handlers:
        logger.setLevel(_glog_level())
    return True
