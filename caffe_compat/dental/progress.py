"""Progress of a long run, shown once and cleanly.

On a terminal: one tqdm bar for the whole run (iterations of every stage), with the log lines
written above it (``logging_redirect_tqdm``) instead of into it. Elsewhere (a file, a pipe, CI):
one line per stage on stderr with the time spent and an estimate of the time left (and, for a
long stage, lines at 25, 50 and 75 % of it), while the
console's INFO lines are held back (warnings still show); the run folder's log file keeps every
line in glog's format either way.

The estimate: before any stage has run, the preset's expected time; then the seconds per unit of
work measured so far times the units left (a unit: one training iteration, weighted by the
stage's cost).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass

__all__ = ["Progress", "Stage", "format_seconds"]

log = logging.getLogger("caffe_compat")


def format_seconds(s: float) -> str:
    """``75`` -> ``1 min 15 s``; ``4000`` -> ``1 h 07 min``."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@contextlib.contextmanager
def _no_solver_bars():
    """While the run's own bar is shown, the solvers' per-``step`` bars stay off (one display).

    Scoped to the ``with``: ``Solver.step`` opens ``progress_bar`` from its module's namespace;
    it gets a bar-less stand-in until the run ends. (A solver option to turn its bar off would
    make this unnecessary.)"""
    from caffe_compat.solvers import base

    @contextlib.contextmanager
    def no_bar(*args, **kwargs):
        yield None

    saved = base.progress_bar
    base.progress_bar = no_bar
    try:
        yield
    finally:
        base.progress_bar = saved


@dataclass
class Stage:
    """One step of the run: its name and its work in units (weighted iterations)."""

    name: str
    units: float


class Progress:
    """``with Progress(stages, expected_s) as p: with p.stage(0): ... p.advance(1) ...``"""

    def __init__(self, stages: list[Stage], expected_s: float, stream=None, tty: bool | None = None):
        self.stages = stages
        self.total = float(sum(s.units for s in stages)) or 1.0
        self.expected_s = expected_s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.done = 0.0
        self.t0 = time.monotonic()
        self.bar = None
        self._stack = contextlib.ExitStack()
        self._held: list[tuple[logging.Handler, int]] = []

    def __enter__(self) -> Progress:
        if self.tty:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = self._stack.enter_context(
                tqdm(total=round(self.total), unit="it", file=self.stream, dynamic_ncols=True, leave=False)
            )
            self._stack.enter_context(logging_redirect_tqdm(loggers=[log]))
            self._stack.enter_context(_no_solver_bars())
        else:
            for h in log.handlers:  # the console's glog lines: warnings only (the log file has all)
                if not isinstance(h, logging.FileHandler):
                    self._held.append((h, h.level))
                    h.setLevel(max(h.level, logging.WARNING))
        return self

    def __exit__(self, *exc) -> None:
        for h, level in self._held:
            h.setLevel(level)
        self._held.clear()
        self._stack.close()

    def left_s(self) -> float:
        """Seconds left: measured rate × units left, or the expected time before any work is done."""
        elapsed = time.monotonic() - self.t0
        if self.done <= 0:
            return max(self.expected_s - elapsed, 0.0)
        return elapsed / self.done * (self.total - self.done)

    def _say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(msg.split(":")[0])
            log.info("%s", msg)
        else:
            print(msg, file=self.stream, flush=True)
            log.info("%s", msg)  # the log file gets it too (the console's INFO lines are held back)

    @contextlib.contextmanager
    def stage(self, i: int):
        s = self.stages[i]
        start_done = self.done
        self._current = (i, start_done, 1)  # (stage, its start, the next quarter to report)
        elapsed = time.monotonic() - self.t0
        left = self.left_s()
        eta = time.strftime("%H:%M", time.localtime(time.time() + left))
        self._say(
            f"[{i + 1}/{len(self.stages)}] {s.name}: {format_seconds(elapsed)} elapsed, "
            f"about {format_seconds(left)} left (done ~{eta})"
        )
        yield self
        self.advance(start_done + s.units - self.done)  # whatever the stage did not report

    def advance(self, units: float, **postfix) -> None:
        self.done += units
        if self.bar is not None:
            self.bar.update(round(self.done) - self.bar.n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            return
        i, start, quarter = getattr(self, "_current", (None, 0.0, 4))
        if i is None or quarter > 3 or self.stages[i].units < 100:
            return
        s = self.stages[i]
        if self.done - start >= s.units * quarter / 4:  # a long stage: a line at 25, 50 and 75 %
            self._current = (i, start, quarter + 1)
            self._say(
                f"[{i + 1}/{len(self.stages)}] {s.name}: {25 * quarter} % done, "
                f"about {format_seconds(self.left_s())} left"
            )

    def finish(self) -> None:
        msg = f"done in {format_seconds(time.monotonic() - self.t0)}"
        if self.bar is not None:
            log.info("%s", msg)
        else:
            print(msg, file=self.stream, flush=True)
