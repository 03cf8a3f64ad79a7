"""Stopping on SIGTERM or SIGINT at a point where the state on disk is whole.

A signal only sets a flag; the loop (ES generations, backprop minibatches) checks it where a stop is
safe and raises Interrupted, whose message says what was kept. Handlers are installed only in the main
thread (Python delivers signals there) and the previous ones come back on exit.
"""

from __future__ import annotations

import signal
import threading


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; the run's last checkpoint is on disk."""


class StopSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        return self

    def __exit__(self, *_exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, _frame) -> None:
        self.signum = signum

    def raise_if_stopped(self, what: str) -> None:
        """Raise Interrupted("stopped by signal NAME " + what) once a signal has arrived."""
        if self.signum is not None:
            raise Interrupted(f"stopped by signal {signal.Signals(self.signum).name} {what}")
