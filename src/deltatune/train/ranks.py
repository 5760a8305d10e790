"""More than one training process (``torchrun``): the console of processes other than 0, and the error a
process gets when another one dies.

When one process of a distributed run dies, the others learn it from their next collective: gloo fails with
"Connection reset by peer" / "Connection closed by peer", NCCL with a communicator error or a watchdog
timeout, and ``torchrun`` sends every remaining process SIGTERM. :func:`peer_lost_error` turns the first
kind into :class:`PeerProcessLost`, whose message says what happened and where to look, so that the run's
``train.log`` (written by process 0) says how the run stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

__all__ = ["PeerProcessLost", "other_process_console_quiet", "peer_lost_error"]

_PEER_LOST = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "NCCL error",
    "Watchdog caught collective operation timeout",
)


class PeerProcessLost(RuntimeError):
    """Another process of this distributed run stopped (it died, was killed, or failed): a collective with it
    failed. Its own output says why."""


def peer_lost_error(err: BaseException) -> BaseException:
    """``err`` itself, or :class:`PeerProcessLost` when it is a collective failing because another process of
    a distributed run (``WORLD_SIZE`` > 1) is gone."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not isinstance(err, RuntimeError) or not any(s in str(err) for s in _PEER_LOST):
        return err
    rank = os.environ.get("RANK", "?")
    return PeerProcessLost(
        f"another process of this {world}-process run stopped (this is process {rank}): a collective with it "
        f"failed ({str(err).splitlines()[0][:200]}); that process's own output (torchrun prints which one, "
        "its exit code and error) says why. Resume from the last complete checkpoint with "
        "--resume_from_checkpoint true"
    )


@contextlib.contextmanager
def other_process_console_quiet(quiet: bool = True) -> Iterator[None]:
    """Within the block, deltatune's console handlers of this process show errors only (``quiet``: processes
    other than 0 under ``torchrun``, whose lines would repeat process 0's); files (``train.log``) keep every
    level."""
    package = logging.getLogger("deltatune")
    console = [h for h in package.handlers if not isinstance(h, logging.FileHandler)] if quiet else []
    saved = [(h, h.level) for h in console]
    for handler in console:
        handler.setLevel(max(handler.level, logging.ERROR))
    try:
        yield
    finally:
        for handler, level in saved:
            handler.setLevel(level)
