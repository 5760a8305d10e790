"""One writer per output folder: ``filelock``'s lock on :data:`LOCK_NAME`, held for the whole run.

``filelock`` takes the lock (``flock`` on POSIX, at once or not at all); this module adds what a person needs
around it: the lock file records who holds it (pid, host, start time, command), a second run into the same
folder fails at once with :class:`OutputDirLockedError` naming that holder, and a record left by a run that
died without releasing (the kernel dropped its ``flock``) is reported as a stale lock and taken over with a
notice. Under ``torchrun`` only process 0 locks (it is the only one that writes the folder). While the lock
is held by :func:`run_lock` (or by ``compare`` inside ``sigterm_as_interrupt``), SIGTERM unwinds the run like
Ctrl-C (:mod:`deltatune.train.signals`), so the lock is released; :class:`RunLock` itself installs no handler.

A released lock leaves no file: the record is cleared and the file removed while the lock is still held,
and a process that had opened the removed file before that checks, once it holds the lock, that its file is
still the one at the path (else it retries on the new file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import filelock

from .outputs import LOCK_NAME, OutputDirError
from .ranks import other_process_console_quiet
from .signals import sigterm_as_interrupt

logger = logging.getLogger(__name__)

__all__ = [
    "LOCK_NAME",
    "OutputDirLockedError",
    "RunLock",
    "describe_holder",
    "holder_alive",
    "lock_holder",
    "run_lock",
]


class OutputDirLockedError(OutputDirError):
    """Another live process holds the output folder's lock.

    Attributes:
        holder: The holder record (``pid``, ``host``, ``started``, ``command``), as far as it could be read.
    """

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


class _Replaced(Exception):
    """The lock was won on a file that its releasing holder had removed meanwhile."""


def lock_holder(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder record in ``directory``'s lock file (None when there is none or it is unreadable)."""
    try:
        with open(os.path.join(directory, LOCK_NAME), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_holder(holder: dict[str, Any]) -> str:
    """A lock holder record in words: pid, host, start time, command."""
    started = holder.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        if isinstance(started, int | float)
        else "?"
    )
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}, "
        f"command: {holder.get('command', '?')}"
    )


def holder_alive(holder: dict[str, Any]) -> bool:
    """Whether the process a holder record names still runs (on this host; one on another host is taken as
    running)."""
    pid = holder.get("pid")
    if holder.get("host") not in (None, socket.gethostname()):
        return True
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    """The lock of one output folder (see the module docstring). Re-entrant within one process.

    Args:
        directory: The output folder (created when missing).
        command: The command line to record (default: this process's ``sys.argv``).

    Raises (from :meth:`acquire`):
        OutputDirLockedError: when another live process holds the folder.
    """

    _held: ClassVar[dict[str, tuple[RunLock, int]]] = {}  # realpath → (owner, depth), this process's locks

    def __init__(self, directory: str | os.PathLike[str], command: str | None = None) -> None:
        self.directory = os.fspath(directory)
        if command is None:
            program = os.path.basename(sys.argv[0]) if sys.argv else "python"
            program = "deltatune" if program in ("__main__.py", "deltatune") else program
            command = " ".join(shlex.quote(a) for a in [program, *sys.argv[1:]])
        self.command = command
        self._lock: filelock.BaseFileLock | None = None
        self._created = False
        self.took_over: dict[str, Any] | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.directory, LOCK_NAME)

    def _key(self) -> str:
        return os.path.realpath(self.directory)

    def _on_acquired(self, fd: int) -> None:
        """Runs with the lock just won on ``fd``: checks it is the file at the path, notes a stale record
        (left by a run that died holding it) and writes this process's record."""
        try:
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                raise _Replaced
        except FileNotFoundError:
            raise _Replaced from None
        previous = lock_holder(self.directory)
        if previous and previous.get("pid") != os.getpid():
            self.took_over = previous
            logger.warning(
                "took over a stale lock on %s left by a run that is no longer running (%s)",
                self.directory,
                describe_holder(previous),
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": self.command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)

    def acquire(self) -> RunLock:
        """Takes the lock (at once or not at all); returns ``self``."""
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise OutputDirError(f"--output_dir {self.directory!r} is a file; pass a directory")
        self._created = not os.path.exists(self.directory)
        os.makedirs(self.directory, exist_ok=True)
        key = self._key()
        if key in RunLock._held:  # this process already holds it (e.g. compare → its runs)
            owner, depth = RunLock._held[key]
            RunLock._held[key] = (owner, depth + 1)
            return self
        for _ in range(10):  # retried when the file was replaced between open and lock
            lock = filelock.FileLock(self.path, timeout=0, thread_local=False, on_acquired=self._on_acquired)
            try:
                lock.acquire()
            except _Replaced:
                continue
            except filelock.Timeout:
                holder = self._holder_of_busy_lock()
                self._remove_created_folder()
                raise OutputDirLockedError(self._busy_message(holder), holder) from None
            break
        else:  # pragma: no cover - ten replacements in a row
            raise OutputDirError(f"could not lock {self.directory!r}: its lock file keeps changing")
        self._lock = lock
        RunLock._held[key] = (self, 1)
        return self

    def _holder_of_busy_lock(self) -> dict[str, Any]:
        """The record of a lock another process holds; it may be writing it this very moment (between winning
        the lock and writing its record), so wait a little for the record to appear."""
        deadline = time.monotonic() + 1.0
        while True:
            holder = lock_holder(self.directory)
            if holder or time.monotonic() > deadline:
                return holder or {}
            time.sleep(0.05)

    def _busy_message(self, holder: dict[str, Any]) -> str:
        return (
            f"--output_dir {self.directory!r} is in use by another deltatune run ({describe_holder(holder)}); wait "
            "for it to finish, stop it, or choose another --output_dir"
        )

    def _remove_created_folder(self) -> None:
        """A run refused or finished before writing anything leaves no empty folder it created behind."""
        if self._created:
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)

    def release(self) -> None:
        """Gives the lock back (the record cleared and the lock file removed)."""
        key = self._key()
        owner, depth = RunLock._held.get(key, (None, 0))
        if owner is None:
            return
        if depth > 1:
            RunLock._held[key] = (owner, depth - 1)
            return
        del RunLock._held[key]
        lock, owner._lock = owner._lock, None
        if lock is None:
            return
        with contextlib.suppress(OSError):
            os.truncate(owner.path, 0)
        with contextlib.suppress(OSError):
            os.unlink(
                owner.path
            )  # before unlocking: a process waiting on this file then retries on a new one
        lock.release(force=True)
        owner._remove_created_folder()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike[str], enabled: bool = True) -> Iterator[RunLock | None]:
    """``with run_lock(out):`` holds :class:`RunLock` for the block (``enabled=False``, processes other than 0
    under torchrun: no lock). In every process the block also turns SIGTERM into
    :class:`~deltatune.train.signals.Terminated` (see :func:`~deltatune.train.signals.sigterm_as_interrupt`),
    so that a run stopped by ``timeout``, a scheduler, Docker or Kubernetes unwinds like Ctrl-C: its lock is
    released and it says how to resume. In processes other than 0 the console shows errors only
    (:func:`~deltatune.train.ranks.other_process_console_quiet`)."""
    with sigterm_as_interrupt():
        if not enabled:  # torchrun's other processes: their console lines would repeat process 0's
            with other_process_console_quiet():
                yield None
            return
        with RunLock(directory) as lock:
            yield lock
