"""Signals and process lifetime: a warm stop installed before anything slow, a bounded stop,
and child processes that die with their parent.

``batchcxr.cli`` installs ``EARLY`` when it is imported, before click, numpy, OpenCV, ONNX
Runtime or the database load, so a SIGTERM in the first moments of a start is a warm stop like
any other (only the interpreter's own start-up, before any batchcxr code runs, is uncovered).
Long-running commands keep it and check ``requested`` between batches; short ones put the
default handlers back (and exit at once if a signal already came).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class StopNow(BaseException):
    """A second signal, or the stop timeout: stop at once. Not an Exception, so ``except
    Exception`` blocks never swallow it (as rq's ShutDownImminentException)."""


class Stop:
    """SIGTERM/SIGINT as a warm stop: the first sets ``requested``; a second one, or the stop
    timeout after the first, raises StopNow in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self.timeout_s: float | None = None
        self._alarm_set = False

    def install(self) -> Stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        return self

    def set_timeout(self, seconds: float | None) -> None:
        """After the first signal, stop at once if still running after ``seconds``."""
        self.timeout_s = seconds
        if self.requested:
            self._arm()

    def _arm(self) -> None:
        if self.timeout_s and not self._alarm_set:
            signal.signal(signal.SIGALRM, self._on_timeout)
            signal.alarm(max(1, math.ceil(self.timeout_s)))
            self._alarm_set = True

    def _on_signal(self, signum: int, _frame) -> None:
        if self.requested:
            self.disarm()
            raise StopNow(f"signal {signum} again: stopping now")
        self.requested, self.signum = True, signum
        self._arm()

    def _on_timeout(self, _signum: int, _frame) -> None:
        self.disarm()
        raise StopNow(f"still busy {self.timeout_s:g} s after the stop signal: stopping now")

    def disarm(self) -> None:
        """Cancel the stop timeout (the work ended first): no SIGALRM after this."""
        signal.alarm(0)
        self._alarm_set = False

    def restore_defaults(self) -> None:
        """For commands that are quick: default handlers back; exit now if a signal came already."""
        self.disarm()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
        if self.requested:
            raise SystemExit(0)


EARLY = Stop()
"""The process's stop request, installed by batchcxr.cli at import."""


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux PR_SET_PDEATHSIG with
    SIGKILL); exit now if the parent (pid ``parent``) is already gone. A no-op where prctl is
    missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the prctl: we were handed to another parent
        os._exit(1)


def process_alive(pid: int) -> bool:
    """Is there a process with this pid on this host (that we may signal or not)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
