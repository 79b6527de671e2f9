"""Shared fixtures: paths to the real-Caffe reference data copied into tests/fixtures, and the
``caffe_compat`` logger restored after each test."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("CAFFE_COMPAT_TEST", "1")

FIXTURES = Path(__file__).parent / "fixtures"
CAFFE_REF = FIXTURES / "caffe_reference"


@pytest.fixture(autouse=True)
def _caffe_compat_logger_as_it_was():
    """Each test leaves the ``caffe_compat`` logger as it found it: the tools' ``setup_logging``
    stops it propagating (glog's own handlers), which would hide later tests' records from
    pytest's ``caplog`` depending on the order the tests run in."""
    logger = logging.getLogger("caffe_compat")
    saved = (logger.propagate, logger.level, list(logger.handlers))
    yield
    logger.propagate, level, handlers = saved
    logger.setLevel(level)
    for h in list(logger.handlers):
        if h not in handlers:
            logger.removeHandler(h)
    for h in handlers:
        if h not in logger.handlers:
            logger.addHandler(h)


@pytest.fixture
def caffe_ref() -> Path:
    return CAFFE_REF


@pytest.fixture
def in_dir():
    """Run a block with another working directory: ``with in_dir(path): ...``."""
    import contextlib

    @contextlib.contextmanager
    def _cd(path):
        old = os.getcwd()
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(old)

    return _cd


#: tests/slow.txt: the node ids (or id prefixes: a file, a test without its parameters) of the
#: slow minority, measured with --durations; they get the ``slow`` marker (setup.cfg), so
#: ``pytest -m "not slow"`` (the README's quick command) leaves them to CI (.ci/run runs all).
SLOW_LIST = Path(__file__).parent / "slow.txt"


def pytest_collection_modifyitems(config, items):
    if not SLOW_LIST.is_file():
        return
    prefixes = [
        line.split("#", 1)[0].strip()
        for line in SLOW_LIST.read_text(encoding="utf-8").splitlines()
        if line.split("#", 1)[0].strip()
    ]
    for item in items:
        nodeid = item.nodeid
        if any(nodeid == p or nodeid.startswith(p + "[") or nodeid.startswith(p + "::") for p in prefixes):
            item.add_marker(pytest.mark.slow)
