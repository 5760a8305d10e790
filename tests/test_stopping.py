"""Runs that stop cleanly, whatever stops them (issue 16, item 6): SIGTERM handled like Ctrl-C (exit 143, the
resume hint, the lock released, a checkpoint being written finished first), a stale lock of a dead run taken
over with a message, a resume of a finished run that trains and rewrites nothing, and a full disk inside a
checkpoint write ending with the one-line disk-full message and the last good checkpoint intact."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

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


# ---- resuming a run that is already at its end --------------------------------------------------------------
def tiny_trainer(out: Path, **overrides: Any) -> Any:
    from tiny import QUIET_CPU_ARGS, Blobs, tiny_vit

    from deltatune import LoraConfig, get_peft_model
    from deltatune.train import DeltaTrainer, TrainingArguments

    model = get_peft_model(
        tiny_vit(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    )
    settings = {
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 3,
        "logging_steps": 1,
        "learning_rate": 0.01,
        "lr_scheduler_type": "constant",
    }
    args = TrainingArguments(
        str(out), per_device_train_batch_size=4, **{**QUIET_CPU_ARGS, **settings, **overrides}
    )
    return DeltaTrainer(model, args, train_dataset=Blobs(24, 1))


def files_of(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "limit", [{"max_steps": 6}, {"max_steps": -1, "num_train_epochs": 1}], ids=["steps", "epochs"]
)
def test_resuming_a_finished_run_trains_and_rewrites_nothing(tmp_path: Path, limit: dict[str, Any]) -> None:
    """transformers' loop takes one more optimiser step before it checks ``max_steps``: a resume of a finished
    run changed its adapter. Now it trains nothing, writes no checkpoint, and reports the run's loss."""
    first = tiny_trainer(tmp_path, **limit)
    result = first.train()
    last = tmp_path / "checkpoint-6"
    before = files_of(last)
    folders = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    again = tiny_trainer(tmp_path, **limit)
    resumed = again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 6 and resumed.global_step == 6
    assert files_of(last) == before, "the last checkpoint is rewritten"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == folders
    trained = {k: v for k, v in first.model.state_dict().items() if "lora" in k or "modules_to_save" in k}
    for key, value in again.model.state_dict().items():
        if key in trained:
            assert torch.equal(value, trained[key]), f"{key} changed without training"
    assert resumed.training_loss == pytest.approx(result.training_loss, rel=1e-6)


def test_train_loss_after_a_resume_is_the_whole_runs(tmp_path: Path) -> None:
    whole = tiny_trainer(tmp_path / "whole").train()
    tiny_trainer(tmp_path / "split", max_steps=3).train()  # the same first three steps, then stopped
    resumed = tiny_trainer(tmp_path / "split").train(resume_from_checkpoint=True)
    assert resumed.global_step == 6
    assert resumed.training_loss == pytest.approx(whole.training_loss, rel=1e-5)
    assert resumed.metrics["train_loss"] == pytest.approx(whole.training_loss, rel=1e-5)


def test_the_run_loss_is_a_real_callback_state_restored_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With restore_callback_states_from_checkpoint, transformers restores every entry of the checkpoint's
    stateful_callbacks and warns about one no callback owns; the run-loss entry is DeltaTrainerRunLoss's."""
    import logging

    whole = tiny_trainer(tmp_path / "whole").train()
    tiny_trainer(tmp_path / "split", max_steps=3).train()
    library = logging.getLogger("transformers")
    library.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING"):
            resumed = tiny_trainer(tmp_path / "split", restore_callback_states_from_checkpoint=True).train(
                resume_from_checkpoint=True
            )
    finally:
        library.removeHandler(caplog.handler)
    assert "Checkpoint included callbacks not included" not in caplog.text
    assert resumed.training_loss == pytest.approx(whole.training_loss, rel=1e-5)


def test_the_eta_after_a_resume_counts_the_steps_this_process_took(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resumed at step 50 of 100, 10 steps in 10 s: 40 s left (it said 8 s, as if the first 50 steps had taken
    no time)."""
    from types import SimpleNamespace

    from rich.console import Console

    from deltatune.cli import output

    now = [100.0]
    monkeypatch.setattr(output.time, "perf_counter", lambda: now[0])
    reporter = output.EpochReporter(Console(file=open(os.devnull, "w")), bars=False, header=False)  # noqa: SIM115
    args = SimpleNamespace(num_train_epochs=2, max_steps=-1, disable_tqdm=True)
    reporter.on_train_begin(
        args, SimpleNamespace(is_world_process_zero=True, global_step=50, max_steps=100), None
    )
    now[0] = 110.0
    reporter._pending = {"epoch": 1, "step": 60, "max_steps": 100, "images_per_s": None, "wait_eval": False}
    reporter._flush()
    assert reporter.rows[-1]["eta"] == pytest.approx(40.0)


# ---- a full disk inside a checkpoint write -----------------------------------------------------------------
@pytest.mark.parametrize("writer", ["adapter", "torch.save"])
def test_a_full_disk_inside_a_checkpoint_write_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], writer: str
) -> None:
    """The disk fills while the second checkpoint is written, as seen on a 100 KB tmpfs: either deltatune's
    adapter writer fails (OSError ENOSPC), or ``torch.save`` of the optimizer state fails with its stream
    writer's RuntimeError ("unexpected pos"), and from then on train.log's own writes fail too. One line saying
    the disk is full and naming the checkpoint, exit 1, no logging traceback; the half-written checkpoint is
    removed and the first one is intact and the one a resume picks."""
    import logging
    import shutil
    from collections import namedtuple

    import transformers.trainer
    from safetensors.torch import load_file
    from tiny import save_tiny_vit_dir, write_image_folder

    from deltatune import _weights_io
    from deltatune.cli import main
    from deltatune.train.resume import checkpoint_problem, latest_complete_checkpoint

    save_tiny_vit_dir(tmp_path / "model")
    write_image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "out"
    checkpoints: list[str] = []
    full = [False]

    def second_checkpoint(path: Any) -> bool:
        folder = os.path.basename(os.path.dirname(os.fspath(path)))
        if folder.startswith("checkpoint-") and folder not in checkpoints:
            checkpoints.append(folder)
        return len(checkpoints) == 2 and folder == checkpoints[1]

    written = _weights_io.atomic_write_bytes

    def adapter_writer(path: Any, data: bytes) -> None:
        if writer == "adapter" and second_checkpoint(path):
            full[0] = True
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))
        written(path, data)

    saved = torch.save

    def torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if writer == "torch.save" and isinstance(f, str | os.PathLike) and second_checkpoint(f):
            full[0] = True
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        saved(obj, f, *args, **kwargs)

    usage = namedtuple("usage", "total used free")
    real_usage = shutil.disk_usage
    flush = logging.FileHandler.flush

    def log_flush(self: logging.FileHandler) -> None:
        if full[0] and self.baseFilename.endswith("train.log"):
            raise OSError(errno.ENOSPC, "No space left on device")
        flush(self)

    monkeypatch.setattr(_weights_io, "atomic_write_bytes", adapter_writer)
    monkeypatch.setattr(transformers.trainer.torch, "save", torch_save)
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: usage(10**6, 10**6, 4096) if full[0] else real_usage(p)
    )
    monkeypatch.setattr(logging.FileHandler, "flush", log_flush)
    argv = ["train", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data")]
    argv += ["--output_dir", str(out), "--num_train_epochs", "3", "--per_device_train_batch_size", "4"]
    argv += ["--use_cpu", "--disable_tqdm", "true", "--seed", "0", "--method", "lora", "--r", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("deltatune")]
    assert len(lines) == 1 and "Traceback" not in err and "Logging error" not in err, err
    assert lines[0].startswith("deltatune: error: no space left on the device writing"), lines[0]
    assert checkpoints[1] in lines[0] and "free some space" in lines[0]
    good = latest_complete_checkpoint(out)
    assert good is not None and good.endswith(checkpoints[0]) and checkpoint_problem(good) is None
    assert f"the last complete checkpoint is {good}; resume with: deltatune train" in lines[0], lines[0]
    assert lines[0].endswith("--resume_from_checkpoint true"), lines[0]
    assert load_file(os.path.join(good, "adapter_model.safetensors")), "the last good adapter is readable"
    assert not (out / checkpoints[1]).exists(), "the half-written checkpoint is removed"
    assert not [p for p in out.rglob(".tmp*")], "no temporary file is left"
    assert not (out / ".deltatune.lock").exists()


def test_sigterm_while_an_error_is_handled_lets_it_finish_then_stops() -> None:
    """Under torchrun, process 0 is often handling the error of a collective with the dead process when
    torchrun's SIGTERM comes: its log line must not be cut short. A run that goes on after a routine error
    still stops: the signal comes again."""
    handled = []
    with pytest.raises(Terminated), sigterm_as_interrupt():
        try:
            raise RuntimeError("a collective failed")
        except RuntimeError:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
            handled.append("the error's handling finished")
        threading.Event().wait(600)  # the run goes on; the signal comes again and stops it here (a bound)
        pytest.fail("SIGTERM was lost")
    assert handled == ["the error's handling finished"]


def test_sigterm_while_a_lock_is_held_releases_it(tmp_path: Path) -> None:
    """`deltatune compare` holds RunLock directly: SIGTERM unwinds it too, and the lock is released."""
    out = tmp_path / "out"
    with pytest.raises(Terminated), sigterm_as_interrupt(), RunLock(out):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
    assert not (out / LOCK_NAME).exists()
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)


def test_a_run_lock_installs_no_signal_handler(tmp_path: Path) -> None:
    """The SIGTERM handler belongs to the commands (`run_lock`, `compare`), not to the lock."""
    before = signal.getsignal(signal.SIGTERM)
    with RunLock(tmp_path / "out"):
        assert signal.getsignal(signal.SIGTERM) is before


def test_compare_holds_its_lock_inside_sigterm_as_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`deltatune compare` takes SIGTERM like `train`: the handler is installed while its runs train."""
    import types

    from deltatune.cli import commands, run_args
    from deltatune.train import signals

    seen: list[object] = []
    parsed = types.SimpleNamespace(
        training_args=types.SimpleNamespace(output_dir=str(tmp_path / "out"), resume_from_checkpoint=None),
        options=types.SimpleNamespace(methods=["lora"], baselines=[], overwrite_output_dir=False),
        model="m",
        dataset="d",
    )
    monkeypatch.setattr(run_args, "parse_run", lambda command, argv: parsed)
    monkeypatch.setattr(run_args, "check_sources", lambda parsed, argv: None)
    monkeypatch.setattr("deltatune.train.outputs.training_identity", lambda args: {})
    monkeypatch.setattr(
        commands, "_compare_runs", lambda p, out: seen.append(signal.getsignal(signal.SIGTERM))
    )
    assert commands.compare([]) == 0
    assert seen == [signals._raise_terminated]


def test_sigterm_during_error_handling_is_deferred_once_only() -> None:
    """A SIGTERM deferred for an error being handled comes back once; that one raises even when it lands in
    another error's handling (no endless chain of one-second deferrals)."""
    with pytest.raises(Terminated), sigterm_as_interrupt():
        try:
            raise RuntimeError("a collective failed")
        except RuntimeError:
            os.kill(os.getpid(), signal.SIGTERM)  # deferred
        for _ in range(1200):  # a run that keeps handling routine errors (a bound, not a wait for time)
            try:
                raise ValueError("routine")
            except ValueError:
                threading.Event().wait(0.05)
        pytest.fail("the redelivered SIGTERM was deferred again")


def test_sigterm_inside_a_checkpoint_write_stops_after_it_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM arrives while checkpoint-3's adapter is being written: the checkpoint is finished (trainer state
    included) before the run stops, so the newest checkpoint is complete, not a half-written one."""
    from deltatune.train import trainer as trainer_module
    from deltatune.train.resume import checkpoint_problem, latest_complete_checkpoint

    labels = trainer_module.save_label_maps

    def signalled(model: Any, directory: Any) -> Any:
        if str(directory).endswith("checkpoint-3"):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs here, inside the save
                pass
        return labels(model, directory)

    monkeypatch.setattr(trainer_module, "save_label_maps", signalled)
    trainer = tiny_trainer(tmp_path)
    with pytest.raises(Terminated), sigterm_as_interrupt():
        trainer.train()
    assert trainer.state.global_step == 3
    last = latest_complete_checkpoint(tmp_path)
    assert last is not None and last.endswith("checkpoint-3") and checkpoint_problem(last) is None


def test_a_transformers_without_the_loop_hooks_is_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On transformers 4.x DeltaTrainer's resume-at-the-end and whole-run train_loss fixes cannot run: one
    warning says so instead of silence."""
    import transformers

    monkeypatch.delattr(transformers.Trainer, "_finalize_training")
    with caplog.at_level("WARNING", logger="deltatune"):
        tiny_trainer(tmp_path)
    warned = [r.getMessage() for r in caplog.records if "has no _finalize_training" in r.getMessage()]
    assert len(warned) == 1 and "train_loss" in warned[0], caplog.text
