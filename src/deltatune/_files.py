"""File helpers, the only ones the package writes through: atomic files and folders, strict JSON, file modes,
and locating a file in a local folder or on the Hugging Face Hub.

Every write goes to a temporary name beside its target and is renamed over it once complete and synced, so
a crash or a kill leaves either the old file or the new one, never a torn one. New files get the mode a
plain ``open(path, "w")`` would give them (``0666`` minus the umask), not the ``0600`` of ``mkstemp``.
Temporary names start with :data:`TMP_PREFIX` followed by the writer's pid; :func:`remove_stale_temporaries`
cleans what a killed process left behind. Files written by other libraries (``safetensors.torch.save_file``
creates its files ``0600``) are given the umask's mode with :func:`apply_umask`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = [
    "TMP_PREFIX",
    "apply_umask",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "build_directory",
    "current_umask",
    "read_json",
    "remove_stale_temporaries",
    "resolve_file",
    "strict_json",
    "write_json",
]

TMP_PREFIX = ".tmp-"
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read from ``/proc`` where possible, so no other thread sees it change)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _file_mode() -> int:
    return 0o666 & ~current_umask()


def _tmp_prefix() -> str:
    """Prefix of this process's temporary names: ``.tmp-<pid>-`` (so a later run can tell a dead writer's)."""
    return f"{TMP_PREFIX}{os.getpid()}-"


def apply_umask(path: str | os.PathLike[str]) -> None:
    """Gives ``path`` (every file and folder under it, for a folder) the mode a plain ``open``/``mkdir``
    would have given it under the current umask: ``0666``/``0777`` minus the umask. For files written by
    libraries that create them ``0600`` (safetensors)."""
    mask = current_umask()
    path = os.fspath(path)
    if not os.path.isdir(path):
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                os.chmod(full, 0o666 & ~mask)


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened or synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yields a temporary path beside ``path``; when the block ends without an error, that file is synced,
    given the umask's mode and renamed over ``path``. On an error it is removed and ``path`` is untouched.

    For writers that want a file name (matplotlib's ``savefig``, ``safetensors.torch.save_file``).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
        _fsync_directory(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file, fsync, rename), with the umask's file mode."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), _file_mode())
        os.replace(tmp, path)
        _fsync_directory(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None, so it serialises as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2, **kwargs: Any) -> None:
    """Writes ``data`` as strict JSON (non-finite floats become ``null``), atomically.

    Values JSON cannot hold (paths, numpy scalars) are written with ``str``/``float`` as ``json.dumps``'s
    ``default`` would; ``kwargs`` go to ``json.dumps`` (``sort_keys``, ``ensure_ascii``).
    """

    def default(obj: Any) -> Any:
        for cast in (float, str):
            with contextlib.suppress(TypeError, ValueError):
                result = cast(obj)
                return strict_json(result) if cast is float else result
        return repr(obj)

    text = json.dumps(strict_json(data), indent=indent, allow_nan=False, default=default, **kwargs)
    atomic_write_text(path, text + ("\n" if indent is not None else ""))


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Reads a JSON file.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is not valid UTF-8 JSON (the message names the file and ``what`` it should be).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{os.fspath(path)} is not valid JSON (expected: {what}): {err}") from err
    except RecursionError as err:
        raise ValueError(f"{os.fspath(path)} is nested too deeply to read (expected: {what})") from err


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps the paths ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the filesystem cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


@contextlib.contextmanager
def build_directory(target: str | os.PathLike[str]) -> Iterator[str]:
    """Yields an empty folder beside ``target`` to build a whole directory in; on success it replaces
    ``target``, so a kill leaves either the old folder or the new one complete, never a mix. On an error the
    partial build is removed and ``target`` is untouched.

    Where Linux allows it the two folders are swapped in one atomic step (``RENAME_EXCHANGE``); elsewhere the
    old folder is renamed aside, then the new one into place (a kill between the two leaves the old folder
    under a temporary name beside the new one's, both complete)."""
    target = os.fspath(target).rstrip(os.sep) or os.sep
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    build = tempfile.mkdtemp(prefix=_tmp_prefix(), dir=parent)
    os.chmod(build, 0o777 & ~current_umask())
    try:
        yield build
        if os.path.isdir(target) and not os.path.islink(target) and _exchange(build, target):
            _fsync_directory(parent)
            shutil.rmtree(build, ignore_errors=True)  # now the old folder
            return
        old = None
        if os.path.lexists(target):
            old = os.path.join(parent, f"{_tmp_prefix()}old-{time.monotonic_ns()}")
            os.replace(target, old)
        os.replace(build, target)
        _fsync_directory(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.unlink(old)
    finally:
        if os.path.isdir(build):
            shutil.rmtree(build, ignore_errors=True)


def _writer_pid(entry: str) -> int | None:
    head = entry[len(TMP_PREFIX) :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temporaries(
    directory: str | os.PathLike[str], older_than_s: float = 0.0, dead_writers_only: bool = False
) -> list[str]:
    """Removes :data:`TMP_PREFIX` files and folders a killed process left in ``directory``; returns their names.

    Args:
        directory: Where to look (not recursive).
        older_than_s: Only entries older than this are removed (another live writer's temporary is young).
        dead_writers_only: Remove only temporaries whose writer (the pid in the name) no longer runs, for
            folders other processes may be writing into; names without a pid then follow ``older_than_s``.
    """
    directory = os.fspath(directory)
    removed: list[str] = []
    if not os.path.isdir(directory):
        return removed
    now = time.time()
    for entry in os.listdir(directory):
        if not entry.startswith(TMP_PREFIX):
            continue
        path = os.path.join(directory, entry)
        pid = _writer_pid(entry)
        if pid == os.getpid():
            continue  # this process's own write in progress
        try:
            if dead_writers_only and pid is not None:
                if _alive(pid):
                    continue
            elif now - os.lstat(path).st_mtime < older_than_s:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(entry)
        except OSError:
            continue
    return removed


def resolve_file(
    path_or_repo: str | os.PathLike[str], filename: str, subfolder: str | None = None, **hub_kwargs: Any
) -> str:
    """A local path to ``filename`` in a directory, or the file downloaded from a Hub repo id.

    Raises:
        FileNotFoundError: if a local directory lacks the file, or the Hub has no such repo or file (the
            message says which, and that a Hub id needs the network).
    """
    base = os.fspath(path_or_repo)
    local_dir = os.path.join(base, subfolder) if subfolder else base
    if os.path.isdir(local_dir):
        path = os.path.join(local_dir, filename)
        if not os.path.isfile(path):
            present = sorted(os.listdir(local_dir))[:10]
            raise FileNotFoundError(f"{filename} not found in {local_dir} (it contains: {present})")
        return path
    looks_local = base.startswith((".", "/", "~")) or base.count("/") > 1 or os.sep in base.replace("/", "")
    if os.path.exists(base) or looks_local:
        raise FileNotFoundError(f"{base} is not a directory holding {filename}")
    try:
        from huggingface_hub import hf_hub_download

        allowed = {"revision", "cache_dir", "token", "force_download", "local_files_only"}
        kwargs = {k: v for k, v in hub_kwargs.items() if k in allowed and v is not None}
        return hf_hub_download(base, filename, subfolder=subfolder, **kwargs)
    except Exception as err:
        raise FileNotFoundError(
            f"could not get {filename} from {base!r}: not a local directory, and the Hugging Face Hub did not "
            f"provide it ({type(err).__name__}: {err}). Pass a local directory, or check the repo id "
            "and your network"
        ) from err
