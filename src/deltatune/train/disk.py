"""A full disk while a checkpoint is written, reported as one: ``OSError(ENOSPC)`` naming the folder.

deltatune's own files fail with ``OSError(ENOSPC, path)`` already, but ``torch.save`` (the optimizer,
scheduler and RNG states transformers writes next to the adapter) fails with a ``RuntimeError`` from its
stream writer ("unexpected pos ...", "file write failed") that says nothing of the disk.
"""

from __future__ import annotations

import errno
import os
import shutil

__all__ = ["LOW_SPACE_BYTES", "disk_full_error"]

#: Below this many free bytes a failed write is taken to be the disk filling up.
LOW_SPACE_BYTES = 16 * 2**20

_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")


def _free_bytes(folder: str) -> int | None:
    path = folder
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full_error(err: BaseException, folder: str) -> BaseException:
    """``err`` itself, or, when it is a failed write on a full disk, ``OSError(ENOSPC)`` naming ``folder``."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        if err.filename is None:
            return OSError(err.errno, err.strerror or "No space left on device", folder)
        return err
    if isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_FAILURES):
        free = _free_bytes(folder)
        if free is not None and free < LOW_SPACE_BYTES:
            return OSError(errno.ENOSPC, "No space left on device", folder)
    return err
