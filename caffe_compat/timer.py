"""pycaffe's ``caffe.Timer``: wall-clock intervals in milliseconds, as Caffe's ``Timer``."""

from __future__ import annotations

import time

import torch

from caffe_compat import mode

__all__ = ["Timer"]


class Timer:
    """``start()``, ``stop()``, then ``ms``: the milliseconds between them (Caffe's
    ``Timer::MilliSeconds``). In GPU mode the device is synchronized at both ends, so that the
    interval covers the work queued in it (Caffe's GPU timer records CUDA events). Reading ``ms``
    while running stops the timer first, as Caffe's does."""

    def __init__(self):
        self._start = 0.0
        self._elapsed_ms = 0.0
        self.running = False
        self.has_run_at_least_once = False

    def _sync(self) -> None:
        if mode.mode() == "GPU" and torch.cuda.is_available():
            torch.cuda.synchronize(mode.current_device())

    def start(self) -> None:
        if not self.running:
            self._sync()
            self._start = time.perf_counter()
            self.running = True
            self.has_run_at_least_once = True

    def stop(self) -> None:
        if self.running:
            self._sync()
            self._elapsed_ms = (time.perf_counter() - self._start) * 1e3
            self.running = False

    @property
    def ms(self) -> float:
        """Milliseconds of the last start-stop interval (0 before any)."""
        if not self.has_run_at_least_once:
            return 0.0
        if self.running:
            self.stop()
        return self._elapsed_ms

    @property
    def seconds(self) -> float:
        return self.ms / 1e3
