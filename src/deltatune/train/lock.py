"""One writer per output folder: an advisory lock held for the whole run.

A run takes :data:`LOCK_NAME` inside its output folder with ``fcntl.flock`` (exclusive, non-blocking) and
writes who holds it (pid, host, start time, command) into that file. A second run into the same folder
fails at once with :class:`OutputDirLockedError` naming the holder. The kernel drops a ``flock`` when its
process dies, however it dies, so a folder whose holder was killed is free again; the record it left
behind is reported as a stale lock and taken over with a notice. Under ``torchrun`` only process 0 locks
(it is the only one that writes the folder).

Where ``flock`` is not available (some network filesystems), the holder record alone decides: a record
naming a live process on this host, or any process on another host, refuses the folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from .outputs import LOCK_NAME, OutputDirError

try:  # POSIX only; the record-based fallback covers the rest
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "OutputDirLockedError", "RunLock", "lock_holder", "run_lock"]


class OutputDirLockedError(OutputDirError):
    """Another live process holds the output folder's lock.

    Attributes:
        holder: The holder record (``pid``, ``host``, ``started``, ``command``), as far as it could be read.
    """

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_holder(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder record in ``directory``'s lock file (None when there is none or it is unreadable)."""
    try:
        with open(os.path.join(directory, LOCK_NAME), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(holder: dict[str, Any]) -> str:
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
        self._fd: int | None = None
        self._created = False
        self.took_over: dict[str, Any] | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.directory, LOCK_NAME)

    def _key(self) -> str:
        return os.path.realpath(self.directory)

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
        for _ in range(10):  # retried when the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if not self._flock(fd):
                    holder = self._holder_of_busy_lock()
                    raise OutputDirLockedError(self._busy_message(holder), holder)
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)  # a releasing holder unlinked it meanwhile: lock the new file
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            break
        else:  # pragma: no cover - ten replacements in a row
            raise OutputDirError(f"could not lock {self.directory!r}: its lock file keeps changing")
        previous = lock_holder(self.directory)
        if previous and previous.get("pid") != os.getpid():
            self.took_over = previous
            logger.warning(
                "took over a stale lock on %s left by a run that is no longer running (%s)",
                self.directory,
                _describe(previous),
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": self.command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        self._fd = fd
        RunLock._held[key] = (self, 1)
        return self

    def _flock(self, fd: int) -> bool:
        """True when ``fd`` is now locked by this process; False when another process holds it."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        holder = lock_holder(self.directory)  # no flock here: judge by the record
        if not holder:
            return True
        same_host = holder.get("host") == socket.gethostname()
        return same_host and not _pid_alive(int(holder.get("pid", -1)))

    def _holder_of_busy_lock(self) -> dict[str, Any]:
        """The record of a lock another process holds; it may be writing it this very moment, so wait a
        little for it."""
        deadline = time.monotonic() + 1.0
        while True:
            holder = lock_holder(self.directory)
            if holder or time.monotonic() > deadline:
                return holder or {}
            time.sleep(0.05)

    def _busy_message(self, holder: dict[str, Any]) -> str:
        return (
            f"--output_dir {self.directory!r} is in use by another deltatune run ({_describe(holder)}); wait "
            "for it to finish, stop it, or choose another --output_dir"
        )

    def release(self) -> None:
        """Gives the lock back (the lock file is removed)."""
        key = self._key()
        owner, depth = RunLock._held.get(key, (None, 0))
        if owner is None:
            return
        if depth > 1:
            RunLock._held[key] = (owner, depth - 1)
            return
        del RunLock._held[key]
        fd, owner._fd = owner._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(owner.path)  # before unlocking: a waiting process then retries on a new file
        with contextlib.suppress(OSError):
            os.close(fd)  # closing drops the flock
        if owner._created:  # a run refused before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(owner.directory)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike[str], enabled: bool = True) -> Iterator[RunLock | None]:
    """``with run_lock(out):`` holds :class:`RunLock` for the block; ``enabled=False`` (processes other than
    0 under torchrun) holds nothing."""
    if not enabled:
        yield None
        return
    with RunLock(directory) as lock:
        yield lock
