"""Threads that decode and transform the images of one batch in parallel.

A data layer's prefetch thread (``prefetch.py``) makes its batches one after another; within a
batch, the images are independent once their random draws are made. The layers therefore read
their records in order (LMDB cursor, list position, shuffles), decode them here in parallel,
make every random draw in record order in their own thread, and transform here in parallel
again: the batches are bit-identical to decoding one image at a time. OpenCV's decoding and
NumPy's arithmetic release the GIL, so the threads run at the same time.

``CAFFE_COMPAT_DATA_THREADS`` sets the number of threads (default: the CPU count, at most 4;
1 decodes in the calling thread).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["data_threads", "map_in_order"]

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _forget_pool() -> None:  # a forked child has none of the parent's threads: start afresh
    global _pool, _pool_size, _lock
    _pool, _pool_size, _lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def data_threads() -> int:
    """Threads used per batch: ``CAFFE_COMPAT_DATA_THREADS``, else min(4, CPU count)."""
    text = os.environ.get("CAFFE_COMPAT_DATA_THREADS", "").strip()
    if text:
        try:
            return max(1, int(text))
        except ValueError:
            raise ValueError(f"CAFFE_COMPAT_DATA_THREADS={text!r}: give a whole number of threads") from None
    return max(1, min(4, os.cpu_count() or 1))


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="caffe-data"), n
        return _pool


class Failed:
    """An exception raised for one item, handed back in its place (the caller raises it in order)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


def _guarded(fn: Callable[[Any], Any], item: Any) -> Any:
    try:
        return fn(item)
    except Exception as e:  # noqa: BLE001 - handed back, raised by the caller in record order
        return Failed(e)


def map_in_order(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(item) for item in items]`` on the data threads, in order; an item whose call raised
    gives a :class:`Failed` holding the exception instead of a result."""
    threads = data_threads()
    if min(threads, len(items)) <= 1:
        return [_guarded(fn, item) for item in items]
    return list(_executor(threads).map(lambda item: _guarded(fn, item), items))
