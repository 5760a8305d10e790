"""Runs that stop cleanly, whatever stops them (issue 16, item 6): SIGTERM handled like Ctrl-C (exit 143, the
resume hint, the lock released, a checkpoint being written finished first), a stale lock of a dead run taken
over with a message, a resume of a finished run that trains and rewrites nothing, and a full disk inside a
checkpoint write ending with the one-line disk-full message and the last good checkpoint intact."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deltatune.cli.errors import RunInterrupted, describe_error
from deltatune.train.lock import LOCK_NAME, RunLock, run_lock
from deltatune.train.signals import Terminated, deferred_sigterm, sigterm_as_interrupt


# ---- SIGTERM ------------------------------------------------------------------------------------------------
def test_sigterm_raises_terminated_inside_the_block_only() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as stopped, sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs at the next bytecode boundary
            pass
    assert stopped.value.signum == signal.SIGTERM and stopped.value.reason == "terminated (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler is put back"


def test_a_checkpoint_being_written_is_finished_before_sigterm_stops_the_run() -> None:
    done = []
    with pytest.raises(Terminated), sigterm_as_interrupt():
        with deferred_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
            done.append("the rest of the checkpoint")
        done.append("never: the run stops when the checkpoint is complete")
    assert done == ["the rest of the checkpoint"]


def test_sigterm_is_exit_143_with_the_hint_and_ctrl_c_stays_130() -> None:
    def stopped_by(error: BaseException) -> RunInterrupted:
        try:
            raise error
        except KeyboardInterrupt:
            return RunInterrupted("resume with: deltatune train ... --resume_from_checkpoint true")

    message, status = describe_error(stopped_by(Terminated()))
    assert status == 143 and message.startswith("terminated (SIGTERM); resume with: deltatune train"), message
    assert stopped_by(Terminated()).reason == "terminated (SIGTERM)"
    message, status = describe_error(stopped_by(KeyboardInterrupt()))
    assert status == 130 and message.startswith("interrupted; resume with"), message
    assert stopped_by(KeyboardInterrupt()).reason == "interrupted (Ctrl-C)"


def test_an_application_handler_for_sigterm_is_kept(tmp_path: Path) -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with run_lock(tmp_path / "out"):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- the lock -----------------------------------------------------------------------------------------------
def test_a_stale_lock_of_a_dead_run_is_taken_over_with_a_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run killed while holding the folder leaves its record (the kernel dropped its lock): the next run
    takes it over, saying whose it was; a released lock leaves no file and no empty folder it created."""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    record = {
        "pid": int(dead.stdout),
        "host": socket.gethostname(),
        "started": 0,
        "command": "deltatune train x",
    }
    (out / LOCK_NAME).write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="deltatune"), RunLock(out, command="mine") as lock:
        assert lock.took_over == record
        assert json.loads((out / LOCK_NAME).read_text())["command"] == "mine"
    assert "took over a stale lock" in caplog.text and f"pid {record['pid']}" in caplog.text
    assert "deltatune train x" in caplog.text
    assert not (out / LOCK_NAME).exists()
    with RunLock(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists(), "a folder the lock created and nothing wrote is removed"


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    with RunLock(tmp_path) as outer, RunLock(tmp_path) as inner:
        assert inner.took_over is None and outer.took_over is None
    assert not (tmp_path / LOCK_NAME).exists()
