"""Caffe's SignalHandler: SIGINT / SIGHUP / SIGTERM turned into solver actions checked between
iterations.

``caffe train --sigint_effect stop|snapshot|none --sighup_effect stop|snapshot|none`` (defaults
``stop`` and ``snapshot``, Caffe's), and ``--sigterm_effect`` (default ``stop``; not in Caffe,
where SIGTERM kills the run without a snapshot): clusters pre-empt jobs with SIGTERM, and
``stop`` ends training as Caffe's ``stop`` does, writing the final snapshot (unless
``snapshot_after_train: false``), so the job can resume from it. The handler only records that a
signal arrived; the solver asks ``action()`` after each iteration (and before each test batch)
and stops or snapshots there, so a weight update is never cut in half.
"""

from __future__ import annotations

import signal

from caffe_compat.errors import SolverError

__all__ = ["NONE", "STOP", "SNAPSHOT", "ACTIONS", "parse_action", "SignalHandler"]

NONE = "none"
STOP = "stop"
SNAPSHOT = "snapshot"
ACTIONS = (STOP, SNAPSHOT, NONE)


def parse_action(name: str, flag: str = "sigint_effect") -> str:
    """Validate a ``--sigint_effect`` / ``--sighup_effect`` / ``--sigterm_effect`` value."""
    if name not in ACTIONS:
        raise SolverError(f"Invalid signal effect {name!r} for --{flag}; use one of: stop, snapshot, none")
    return name


class SignalHandler:
    """Install SIGINT/SIGHUP/SIGTERM handlers for the lifetime of a ``with`` block (or until ``restore``).

    ``handler.action()`` returns ``"stop"``, ``"snapshot"`` or ``"none"`` and forgets the signal,
    as Caffe's ``SignalHandler::CheckForSignals``. Pass it to ``solver.set_action_function``.
    """

    def __init__(self, sigint_effect: str = STOP, sighup_effect: str = SNAPSHOT, sigterm_effect: str | None = STOP):
        self.sigint_effect = parse_action(sigint_effect, "sigint_effect")
        self.sighup_effect = parse_action(sighup_effect, "sighup_effect")
        # None: SIGTERM keeps its default (the processes of a multi-process run, which their
        # launcher terminates when a peer fails)
        self.sigterm_effect = None if sigterm_effect is None else parse_action(sigterm_effect, "sigterm_effect")
        self._got_sigint = False
        self._got_sighup = False
        self._got_sigterm = False
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._got_sigint = True
        elif signum == getattr(signal, "SIGHUP", None):
            self._got_sighup = True
        elif signum == signal.SIGTERM:
            self._got_sigterm = True

    def install(self) -> SignalHandler:
        sigs = [signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
        if self.sigterm_effect is not None:
            sigs.append(signal.SIGTERM)
        for s in sigs:
            try:
                self._previous[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread: signals cannot be caught here
                break
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def __enter__(self) -> SignalHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def action(self) -> str:
        if self._got_sigint:
            self._got_sigint = False
            return self.sigint_effect
        if self._got_sighup:
            self._got_sighup = False
            return self.sighup_effect
        if self._got_sigterm:
            self._got_sigterm = False
            return self.sigterm_effect
        return NONE
