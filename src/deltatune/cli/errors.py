"""The command line's failure boundary: every exception becomes one line (what went wrong, which argument or
file, what to do) and an exit status -- 2 for a usage error (an argument, a file or a setting the user can
fix), 1 for a failure while running (permissions, a full disk, a diverging run, a bug), 130 for Ctrl-C and
143 for SIGTERM (what ``timeout``, schedulers, Docker and Kubernetes send; see
:mod:`deltatune.train.signals`).

Importing this module imports neither torch nor transformers: the boundary must work whatever failed to import.
"""

from __future__ import annotations

import errno
import signal
import sys
import unicodedata
from typing import Any

__all__ = [
    "FAILURE",
    "INTERRUPTED",
    "TERMINATED",
    "USAGE",
    "DiskFull",
    "RunInterrupted",
    "describe_error",
    "one_line",
    "printable",
    "resume_hint",
    "shell_quote",
]

USAGE, FAILURE, INTERRUPTED = 2, 1, 130
TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process that SIGTERM ended
_MAX_LINE = 2000


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run; ``hint`` says how to continue it (the command that resumes, or that there
    is nothing to resume).

    Raised while handling the interrupt, it keeps which one it was: ``signum`` (SIGINT for Ctrl-C) and
    ``reason`` (``"interrupted (Ctrl-C)"``, ``"terminated (SIGTERM)"``).
    """

    def __init__(self, hint: str) -> None:
        super().__init__(hint)
        self.hint = hint
        self.signum = _signal_of(sys.exc_info()[1])
        self.reason = "interrupted (Ctrl-C)" if self.signum == signal.SIGINT else str(sys.exc_info()[1])


def _signal_of(err: BaseException | None) -> int:
    """The signal behind an interrupt: that of a ``Terminated`` (SIGTERM) or of one it was raised from."""
    seen = 0
    while err is not None and seen < 5:
        number = getattr(err, "signum", None)
        if isinstance(number, int):
            return number
        err, seen = err.__context__, seen + 1
    return signal.SIGINT


#: Bidirectional overrides and isolates: they reorder what follows on screen (a spoofing tool).
_BIDI_CONTROLS = frozenset(chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A)))


def _visible(char: str) -> str:
    if char in "\n\t" or (unicodedata.category(char) != "Cc" and char not in _BIDI_CONTROLS):
        return char
    return f"\\x{ord(char):02x}" if ord(char) < 256 else f"\\u{ord(char):04x}"


def printable(text: Any) -> str:
    """``text`` with control characters (ESC, BEL, CR, C1 codes, bidirectional overrides) written as visible
    ``\\xNN`` escapes, so a label, path or message cannot drive the terminal; tabs and newlines are kept."""
    value = str(text)
    return value if value.isprintable() else "".join(map(_visible, value))


def escaped_line(text: Any) -> str:
    """``text`` as one line, nothing lost: :func:`printable`, with line breaks written as ``\\n`` (a name
    from the user's data shown in a table or a warning)."""
    return printable(text).replace("\n", "\\n")


def one_line(text: Any) -> str:
    """``text`` on one line (whitespace runs collapsed), with :func:`printable` characters, bounded in length."""
    line = " ".join(printable(text).split())
    return line if len(line) <= _MAX_LINE else line[: _MAX_LINE - 3] + "..."


def _oserror(err: OSError) -> tuple[str, int]:
    name = err.filename if err.filename is not None else None
    where = f" {name!r}" if name is not None else ""
    reason = err.strerror or str(err)
    code = err.errno
    if isinstance(err, PermissionError) or code in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied:{where} ({reason}); check the owner and mode of that file or folder, or choose "
            "a path you can read and write",
            FAILURE,
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device writing{where} ({reason}); free some space or write elsewhere",
            FAILURE,
        )
    if code == errno.ENAMETOOLONG:
        return f"a path is too long{where} ({reason}); choose a shorter --output_dir or file name", USAGE
    if code == errno.EROFS:
        return f"the filesystem is read-only{where}; write somewhere else", FAILURE
    if isinstance(err, NotADirectoryError):
        return f"not a directory:{where} ({reason}); pass a directory there", USAGE
    if isinstance(err, IsADirectoryError):
        return f"is a directory:{where} ({reason}); pass a file there", USAGE
    if isinstance(err, FileNotFoundError):
        return (f"{err}" if name is None else f"no such file or directory:{where}"), USAGE
    if code is None:  # transformers/huggingface_hub raise bare OSError(message) for unloadable models
        return f"{err}", FAILURE
    return f"{reason}{where}", FAILURE


def describe_error(err: BaseException) -> tuple[str, int]:
    """The one line to print for ``err`` (without the ``deltatune: error:`` prefix) and the exit status."""
    if isinstance(err, KeyboardInterrupt):
        hint = err.hint if isinstance(err, RunInterrupted) else ""
        signum = _signal_of(err)
        what = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
        status = INTERRUPTED if signum == signal.SIGINT else 128 + signum
        # the hint is already one printable line; collapsing its whitespace would change the paths in its command
        return f"{what}{'; ' + hint if hint else ''}", status
    if isinstance(err, RecursionError):
        return (
            "an input is nested too deeply to read (a config or JSON file?); check the files you passed",
            USAGE,
        )
    if isinstance(err, MemoryError):
        return "out of memory; use a smaller batch size or model, or fewer images at once", FAILURE
    if isinstance(err, OSError):
        message, code = _oserror(err)
        return one_line(message), code
    if isinstance(err, ValueError):  # our errors about a flag, a config or a file (peft's type for them)
        return one_line(err), USAGE
    if isinstance(err, DiskFull):  # one line already, with an exact resume command
        return str(err), FAILURE
    if type(err).__module__.startswith("deltatune"):  # e.g. NonFiniteLossError: its message says what to do
        return one_line(str(err) or type(err).__name__), FAILURE
    return one_line(f"{type(err).__name__}: {err}; run again with --debug for the traceback"), FAILURE


class DiskFull(Exception):
    """A training run stopped by a full disk; its message says what was kept and how to resume."""


_ANSI_C_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def shell_quote(arg: str) -> str:
    """``arg`` quoted for a POSIX shell, exactly: :func:`shlex.quote`, or for an argument with a line break,
    a tab or another control character, bash's ``$'...'`` with those characters escaped (so the command
    stays one printable line that a shell reads back as the same argument)."""
    import shlex

    if arg.isprintable():
        return shlex.quote(arg)
    escaped = "".join(
        _ANSI_C_ESCAPES.get(c)
        or (c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\U{ord(c):08x}")
        for c in arg
    )
    return f"$'{escaped}'"


def resume_hint(argv: list[str], out: str) -> str:
    """What to tell someone who pressed Ctrl-C during ``deltatune train ARGV``: the one command that resumes
    (the same arguments, ``--resume_from_checkpoint true`` instead of ``--overwrite_output_dir``), or that no
    checkpoint was saved yet."""
    from ..train.resume import latest_complete_checkpoint

    last = latest_complete_checkpoint(out)
    if last is None:
        return "no checkpoint was written yet, so there is nothing to resume; run the same command again to start over"
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--overwrite_output_dir":
            continue
        if arg.startswith("--resume_from_checkpoint"):
            skip = "=" not in arg
            continue
        kept.append(arg)
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in kept):
        kept += ["--output_dir", out]
    command = " ".join(
        shell_quote(a) for a in ["deltatune", "train", *kept, "--resume_from_checkpoint", "true"]
    )
    return f"the last complete checkpoint is {escaped_line(last)}; resume with: {command}"
