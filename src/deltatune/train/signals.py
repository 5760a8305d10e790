"""SIGTERM handled like Ctrl-C while a run holds its output folder.

``timeout``, batch schedulers, Docker and Kubernetes stop a process with SIGTERM, which by default ends it
at once: no resume hint, no line in ``train.log``, a lock record left behind. Inside
:func:`sigterm_as_interrupt` the signal raises :class:`Terminated` (a ``KeyboardInterrupt``) instead, so the
run unwinds through the same paths as Ctrl-C: the lock is released, ``train.log`` says how the run stopped,
the command line prints the command that resumes and exits with 143 (128 + SIGTERM), as a shell reports a
process SIGTERM ended. Under ``torchrun`` this is also how the launcher stops the other processes when one
of them fails.

A checkpoint being written when the signal comes is finished first (:func:`deferred_sigterm`, around
``DeltaTrainer._save_checkpoint``): the newest checkpoint is then complete, never a half-written one next to
the previous. A SIGTERM that comes while an error is being handled (the run already stopping on it) lets that
finish and is delivered again a second later, once: that one raises even inside another error's handling. A second SIGTERM while the first unwinds ends the process at
once (the default action).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = ["Terminated", "deferred_sigterm", "sigterm_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM while :func:`sigterm_as_interrupt` was active.

    Attributes:
        signum: The signal number (``signal.SIGTERM``).
        reason: How the run stopped, for its log (``"terminated (SIGTERM)"``).
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
        why = "; torchrun stops every process this way when one of them fails" if launched else ""
        self.reason = f"terminated ({signal.Signals(signum).name}{why})"
        super().__init__(self.reason)
        self.signum = signum


class _State:
    deferring = 0  # nesting depth of deferred_sigterm() blocks
    pending: int | None = None  # a signal that came inside one, or while an error was handled
    active = False  # inside sigterm_as_interrupt()
    redelivered = False  # a signal was deferred once for an error being handled: the next one raises


#: Seconds after which a SIGTERM that came while an error was being handled is delivered again.
REDELIVER_S = 1.0


def _redeliver(signum: int) -> None:
    if _State.pending == signum and _State.active:
        os.kill(os.getpid(), signum)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    if _State.deferring:
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
        _State.pending = signum
        return
    handling = sys.exc_info()[1]
    if handling is not None and not isinstance(handling, KeyboardInterrupt) and not _State.redelivered:
        # An error is being handled: most likely the run is stopping on it (under torchrun, a collective with a
        # dead process failed just before torchrun's SIGTERM), and its log line and one-line error must not be
        # cut short. Delivered again in a moment: a run that goes on after a routine error stops then.
        _State.pending = signum
        _State.redelivered = True  # deferred once only: the signal delivered again always raises
        timer = threading.Timer(REDELIVER_S, _redeliver, (signum,))
        timer.daemon = True
        timer.start()
        return
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    _State.pending = None
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread; the previous handler is put
    back afterwards. Does nothing outside the main thread or where a handler other than the default is
    installed (an application's own choice is kept)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: Any = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    _State.active, _State.redelivered = True, False
    try:
        yield
    finally:
        _State.active = False
        signal.signal(signal.SIGTERM, previous)
        _State.pending, _State.redelivered = None, False


@contextlib.contextmanager
def deferred_sigterm() -> Iterator[None]:
    """A SIGTERM that comes inside the block (while :func:`sigterm_as_interrupt` is active) raises
    :class:`Terminated` when the block ends, not in the middle of it (a checkpoint being written)."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
    if not _State.deferring and _State.pending is not None:  # the block finished: now stop
        signum, _State.pending = _State.pending, None
        raise Terminated(signum)
