"""Background prefetching of batches, as Caffe's ``BasePrefetchingDataLayer``.

One worker thread calls ``produce()`` repeatedly and queues up to ``depth`` results ahead
(Caffe's ``data_param.prefetch``, default 4). Because a single thread produces the batches in
sequence and ``produce`` owns all the random state it uses, the k-th batch is the same whether or
not prefetching is on: prefetching changes when a batch is made, never which. OpenCV decoding,
LMDB reads and NumPy copies release the GIL, so the worker overlaps with the training step.

An exception in ``produce`` is raised by the ``next()`` call that would have returned that batch
(and by every later call). The thread starts on the first ``next()`` and stops on ``close()``;
it holds no reference to the layer that owns it, so the layer can be garbage-collected (the
layer closes the prefetcher through ``weakref.finalize``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """Call ``produce()`` ahead of time in a daemon thread; ``depth`` 0 means synchronously."""

    def __init__(self, produce: Callable[[], T], depth: int = 4, name: str = "prefetch"):
        self._produce = produce
        self.depth = int(depth)
        self.name = name
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def next(self) -> T:
        if self._error is not None:
            raise self._error
        if self.depth <= 0:
            try:
                return self._produce()
            except BaseException as e:
                self._error = e
                raise
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(
                target=_worker, args=(self._produce, self._queue, self._stop), name=self.name, daemon=True
            )
            self._thread.start()
        ok, item = self._queue.get()
        if not ok:
            self._error = item
            raise item
        return item

    def close(self) -> None:
        """Stop the worker (it finishes the batch it is making, then exits)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)

    @property
    def started(self) -> bool:
        """Whether a batch has been asked for (the worker, if any, has been started)."""
        return self._thread is not None or self._error is not None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _worker(produce: Callable, q: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            item = produce()
        except BaseException as e:  # delivered to the consumer, in order
            _put(q, (False, e), stop)
            return
        if not _put(q, (True, item), stop):
            return
