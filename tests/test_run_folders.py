"""One output folder = one run (issue 11, items 1-5 and 7): contradictory requests refused before anything is
touched, another run refused naming what differs, the folder locked while a run writes, Ctrl-C stopping
cleanly with the command that resumes, exact resume with augmentation and DataLoader workers, and the best
and last checkpoints kept by default."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny_vit_dir, write_image_folder

from deltatune.cli import main
from deltatune.train.trainer import DeltaTrainer

QUICK = [
    "--num_train_epochs", "2",
    "--per_device_train_batch_size", "4",
    "--gradient_accumulation_steps", "1",
    "--logging_steps", "2",
    "--use_cpu",
    "--disable_tqdm", "true",
    "--seed", "0",
    "--validation_split", "0.25",
    "--method", "lora",
    "--r", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("folders")
    save_tiny_vit_dir(root / "model")
    write_image_folder(root / "data", per_class=8)
    return {"root": str(root), "model": str(root / "model"), "data": str(root / "data")}


def train(assets: dict[str, str], out: str | Path, *extra: str) -> int:
    argv = ["train", "--model", assets["model"], "--dataset", assets["data"], "--output_dir", str(out)]
    return main([*argv, *QUICK, *extra])


@pytest.fixture(scope="module")
def finished(assets: dict[str, str]) -> str:
    out = os.path.join(assets["root"], "finished")
    assert train(assets, out) == 0
    return out


def copy_of(run: str, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def listing(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in sorted(folder.rglob("*"))}


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("deltatune:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- item 1 -------------------------------------------------------------------------------------
def test_overwrite_with_resume_is_refused_before_anything_is_removed(
    assets: dict[str, str], finished: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_of(finished, tmp_path)
    before = listing(run)
    assert any(name.startswith("checkpoint-") for name in before)
    assert train(assets, run, "--overwrite_output_dir", "--resume_from_checkpoint", "true") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--overwrite_output_dir" in line and "--resume_from_checkpoint" in line
    assert listing(run) == before, "nothing may be touched by a refused request"
    assert train(assets, run, "--resume_from_checkpoint", str(run / "checkpoint-404")) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert listing(run) == before
    fresh = tmp_path / "fresh"
    assert train(assets, fresh, "--resume_from_checkpoint", "true") == 2
    assert "no complete checkpoint" in one_error_line(capsys.readouterr().err)
    assert not fresh.exists(), "a refused run leaves no empty folder behind"
    legacy = copy_of(finished, tmp_path / "legacy")  # a record written before the training arguments were
    record = json.loads((legacy / "deltatune_run.json").read_text())
    del record["training"]
    (legacy / "deltatune_run.json").write_text(json.dumps(record))
    assert train(assets, legacy, "--resume_from_checkpoint", "true") == 2
    assert "earlier deltatune version" in one_error_line(capsys.readouterr().err)


# ---- item 2 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [["--learning_rate", "0.01"], ["--seed", "1"]], ids=["lr", "seed"])
def test_another_run_into_a_finished_folder_is_refused_naming_the_difference(
    assets: dict[str, str],
    finished: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: list[str],
) -> None:
    run = copy_of(finished, tmp_path)
    before = listing(run)
    for resume in ([], ["--resume_from_checkpoint", "true"]):
        assert train(assets, run, *change, *resume) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "different run" in line and change[0].lstrip("-") in line, line
        assert "--overwrite_output_dir" in line and "--resume_from_checkpoint" in line
    assert listing(run) == before


def test_overwrite_removes_what_the_previous_run_wrote_and_runs_never_share_checkpoints(
    assets: dict[str, str], finished: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_of(finished, tmp_path)
    (run / "eval_results.json").write_text("{}")
    (run / "confusion_matrix.png").write_bytes(b"old")
    (run / "compare.md").write_text("old")  # written by runs, but not by this one
    (run / "checkpoint-99").mkdir()
    (run / "notes.txt").write_text("mine")
    old_checkpoints = {p.name for p in run.glob("checkpoint-*")}
    assert (
        train(assets, run, "--learning_rate", "0.01", "--num_train_epochs", "1", "--overwrite_output_dir")
        == 0
    )
    for name, old in (("eval_results.json", b"{}"), ("confusion_matrix.png", b"old"), ("compare.md", b"old")):
        assert not (run / name).exists() or (run / name).read_bytes() != old, f"the old {name} is left"
    assert not (run / "compare.md").exists()
    assert (run / "notes.txt").read_text() == "mine", "files deltatune did not write stay"
    new_checkpoints = {p.name for p in run.glob("checkpoint-*")}
    assert "checkpoint-99" not in new_checkpoints and new_checkpoints != old_checkpoints
    record = json.loads((run / "deltatune_run.json").read_text())
    assert record["training"]["learning_rate"] == 0.01 and record["status"] == "finished"
    # a checkpoint of another folder's run is never resumed into a folder holding a run
    other = copy_of(finished, tmp_path / "other")
    checkpoint = sorted(other.glob("checkpoint-*"))[0]
    capsys.readouterr()
    assert train(assets, run, "--resume_from_checkpoint", str(checkpoint)) == 2
    assert "different run" in one_error_line(capsys.readouterr().err)
    assert train(assets, tmp_path / "fresh", "--resume_from_checkpoint", str(checkpoint), "--seed", "3") == 2
    assert "belongs to a different run" in one_error_line(capsys.readouterr().err)


# ---- item 3 -------------------------------------------------------------------------------------
_HOLDER = """
import sys, time
from deltatune.train.lock import RunLock
RunLock(sys.argv[1], command="holder-process").acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_process_fails_at_once_naming_the_holder_and_a_dead_holder_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from deltatune.train.lock import LOCK_NAME, OutputDirLockedError, RunLock

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked", holder.stderr
        started = time.monotonic()
        with pytest.raises(OutputDirLockedError) as refused:
            RunLock(out).acquire()
        assert time.monotonic() - started < 5, "the second process must fail at once, not wait"
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and "holder-process" in message and "started" in message
        assert refused.value.holder["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    assert (out / LOCK_NAME).exists(), "a killed holder leaves its record behind"
    with caplog.at_level("WARNING", logger="deltatune"), RunLock(out) as lock:
        assert lock.took_over is not None and lock.took_over["pid"] == holder.pid
    assert "stale lock" in caplog.text and str(holder.pid) in caplog.text
    assert not (out / LOCK_NAME).exists(), "a released lock leaves no file"


# ---- item 5 -------------------------------------------------------------------------------------
def interrupt_after(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Ctrl-C right after checkpoint-``step`` is complete (as if pressed then)."""
    original = DeltaTrainer._save_checkpoint

    def save_then_interrupt(self: DeltaTrainer, model: Any, trial: Any) -> None:
        original(self, model, trial)
        if self.state.global_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(DeltaTrainer, "_save_checkpoint", save_then_interrupt)


def run_interrupted(assets: dict[str, str], out: Path, step: int, *extra: str) -> tuple[int, str]:
    mp = pytest.MonkeyPatch()
    interrupt_after(mp, step)
    try:
        status = train(assets, out, *extra)
    except KeyboardInterrupt:  # a CLI that does not catch it
        status = -1
    finally:
        mp.undo()
    return status, ""


def test_ctrl_c_stops_cleanly_with_the_resume_command_and_a_plain_rerun_is_refused(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    status, _ = run_interrupted(assets, out, 5)
    err = capsys.readouterr().err
    assert status == 130, err
    line = one_error_line(err)
    assert "interrupted" in line and "checkpoint-5" in line and "--resume_from_checkpoint true" in line
    command = line.split("resume with: ", 1)[1]
    assert command.startswith("deltatune train") and "--resume_from_checkpoint true" in command
    before = listing(out)
    assert train(assets, out) == 2, "a rerun without --resume_from_checkpoint must not start over"
    line = one_error_line(capsys.readouterr().err)
    assert "unfinished" in line and "--resume_from_checkpoint" in line and "--overwrite_output_dir" in line
    assert listing(out) == before
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = [
        out / f".tmp-{dead.stdout.strip()}-adapter",
        out / "checkpoint-5" / f".tmp-{dead.stdout.strip()}-x",
    ]
    for path in stale:  # what a save killed mid-write leaves behind
        path.write_bytes(b"partial")
    argv = shlex.split(command)[1:]
    assert main(argv) == 0
    assert not any(path.exists() for path in stale), "the next run removes a killed save's temporaries"
    assert json.loads((out / "deltatune_run.json").read_text())["status"] == "finished"
    assert not (out / ".deltatune.lock").exists(), "the lock is released when a run ends, interrupted or not"


# ---- items 4 and 7 ------------------------------------------------------------------------------
AUGMENTED = [
    "--num_train_epochs", "3",
    "--save_strategy", "steps", "--save_steps", "4",
    "--eval_strategy", "steps", "--eval_steps", "4",
    "--dataloader_num_workers", "2",
    "--learning_rate", "0.01",
]  # fmt: skip


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    left, right = adapter(a), adapter(b)
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(right[key], left[key], rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.slow
def test_resume_with_augmentation_and_workers_is_exact_and_keeps_best_and_last(
    assets: dict[str, str], tmp_path: Path
) -> None:
    """18 training images in batches of 4: 5 steps per epoch, checkpoints every 4 steps (mid-epoch) and at
    15. The run interrupted after checkpoint-8, reduced to a clean copy of it, resumes to the uninterrupted
    run's last checkpoint, adapter and metrics -- random crops and flips and two DataLoader workers included."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train(assets, whole, *AUGMENTED) == 0
    status, _ = run_interrupted(assets, resumed, 8, *AUGMENTED)
    assert status in (130, -1)
    for entry in resumed.iterdir():  # a clean copy of checkpoint-8 and the run record, nothing else
        if entry.name not in ("checkpoint-8", "deltatune_run.json"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    assert train(assets, resumed, *AUGMENTED, "--resume_from_checkpoint", "true") == 0
    assert_same_adapter(whole / "checkpoint-15", resumed / "checkpoint-15")
    assert_same_adapter(whole, resumed)
    expected = json.loads((whole / "metrics.json").read_text())
    got = json.loads((resumed / "metrics.json").read_text())
    for key in ("eval_loss", "eval_accuracy"):
        assert got["eval"][key] == pytest.approx(expected["eval"][key], rel=1e-6, abs=1e-7), key
    # item 7: by default the best and the last checkpoint are kept, and the best one is what was saved
    state = json.loads((whole / "checkpoint-15" / "trainer_state.json").read_text())
    kept = sorted(p.name for p in whole.glob("checkpoint-*"))
    best = os.path.basename(state["best_model_checkpoint"])
    assert len(kept) <= 2 and best in kept and "checkpoint-15" in kept, kept
    assert_same_adapter(whole / best, whole)


def test_default_run_keeps_only_the_best_and_the_last_checkpoint(
    assets: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert train(assets, out, "--num_train_epochs", "4") == 0
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert checkpoints[-1].name == "checkpoint-20"
    names = {p.name for p in checkpoints}
    assert len(names) <= 2 and os.path.basename(state["best_model_checkpoint"]) in names, names
    assert_same_adapter(Path(state["best_model_checkpoint"]), out)


#: `deltatune train` that, once its first checkpoint is complete, writes the file argv[1] and waits for the
#: file argv[2] (the test writes it, or stops the process first): the test acts on a state, never on time.
PAUSING_TRAIN = """
import os, sys, time
from deltatune.train.trainer import DeltaTrainer
ready, go = sys.argv[1], sys.argv[2]
original = DeltaTrainer._save_checkpoint
def save_then_wait(self, model, trial):
    original(self, model, trial)
    if not os.path.exists(ready):
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.02)
DeltaTrainer._save_checkpoint = save_then_wait
from deltatune.cli import main
sys.argv = ["deltatune", *sys.argv[3:]]
sys.exit(main(sys.argv[1:]))
"""


def start_paused(argv: list[str], tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], Path]:
    """Starts :data:`PAUSING_TRAIN` and waits until it has its first checkpoint (or has ended); returns the
    process and the file that lets it go on."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSING_TRAIN, str(ready), str(go), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 600  # a bound for a hung process, not a wait: it is polled for its state
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint was written: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    return proc, go


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "status", "said"),
    [(signal.SIGINT, 130, "interrupted (Ctrl-C)"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
    ids=["ctrl-c", "sigterm"],
)
def test_real_processes_second_run_refused_and_a_stop_prints_the_resume_command(
    assets: dict[str, str], tmp_path: Path, signum: int, status: int, said: str
) -> None:
    """Two `deltatune train` processes into one folder: the second fails at once naming the first. SIGINT
    (Ctrl-C) and SIGTERM (`timeout`, schedulers, Docker, Kubernetes) stop the first without a traceback: one
    line with the command that resumes it, exit 130 / 143, the lock released, train.log saying how the run
    stopped, the newest checkpoint complete. The first process waits after its first checkpoint until it is
    stopped, so neither process can finish early however busy the machine is."""
    from deltatune.train.resume import checkpoint_problem, latest_complete_checkpoint

    out = tmp_path / "out"
    argv = ["train", "--model", assets["model"], "--dataset", assets["data"], "--output_dir", str(out)]
    argv += QUICK
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first, _ = start_paused(argv, tmp_path, env)
    try:
        if signum == signal.SIGINT:
            second = subprocess.run(
                [sys.executable, "-m", "deltatune", *argv],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
            )
            assert second.returncode == 2, second.stderr[-3000:]
            line = one_error_line(second.stderr)
            assert "in use by another deltatune run" in line and f"pid {first.pid}" in line, line
        first.send_signal(signum)
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == status, err[-3000:]
    line = one_error_line(err)
    assert said.split(" (")[0] in line and "resume with: deltatune train" in line, line
    assert "--resume_from_checkpoint true" in line and "Traceback" not in err, err[-3000:]
    log = (out / "train.log").read_text(encoding="utf-8")
    assert f"the run stopped: {said}" in log and "resume with: deltatune train" in log, log[-3000:]
    assert not (out / ".deltatune.lock").exists(), "the lock is released"
    last = latest_complete_checkpoint(out)
    checkpoints = [str(p) for p in out.glob("checkpoint-*")]
    assert checkpoints == [last] and checkpoint_problem(last) is None, "stopped at its first checkpoint"


def test_checkpoints_are_rotated_by_step_not_by_modification_time(tmp_path: Path) -> None:
    """A checkpoint whose folder looks newer (copied, restored from a backup) must not make rotation delete
    the checkpoint just written."""
    from tiny import QUIET_CPU_ARGS, Blobs, tiny_vit
    from transformers import TrainerCallback

    from deltatune import LoraConfig, get_peft_model
    from deltatune.train import TrainingArguments

    class TouchFirst(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            first = tmp_path / "checkpoint-1"
            if first.exists():
                future = time.time() + 3600
                os.utime(first, (future, future))

    model = get_peft_model(
        tiny_vit(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    )
    args = TrainingArguments(
        str(tmp_path), max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1, **QUIET_CPU_ARGS
    )
    DeltaTrainer(model, args, train_dataset=Blobs(24, 1), callbacks=[TouchFirst()]).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]
