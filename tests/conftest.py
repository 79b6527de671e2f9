"""Shared fixtures: paths to the real-Caffe reference data copied into tests/fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CAFFE_COMPAT_TEST", "1")

FIXTURES = Path(__file__).parent / "fixtures"
CAFFE_REF = FIXTURES / "caffe_reference"


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
