"""A training run SIGKILLed mid-epoch resumes from its last complete checkpoint and ends exactly like an
uninterrupted run: same per-step losses, eval metrics, AdaLoRA rank pattern and adapter tensors. The run
(tests/train_worker.py ``resume`` mode) is AdaLoRA with dropout on, so the adapter, the rank allocator's
state, the optimizer/scheduler and the RNG state must all come back from the checkpoint."""

from __future__ import annotations

import json
import os
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

from deltatune.train.resume import latest_complete_checkpoint

WORKER = Path(__file__).with_name("train_worker.py")
SAVE_STEPS, MAX_STEPS = 3, 10  # as in train_worker.run_resume (12 steps per epoch)


def worker(out: Path, *flags: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), "resume", str(out), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen[str]) -> str:
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def result(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    with open(out / "result.json", encoding="utf-8") as fh:
        return json.load(fh), load_file(out / "final.safetensors")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = worker(reference_dir)
    victim = worker(killed_dir, "--pause")  # waits one step after checkpoint-3 until it is killed
    first_state = killed_dir / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json"
    try:
        deadline = time.monotonic() + 600  # a bound for a hung worker; the wait itself is for a state
        while not (killed_dir / "paused").exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not (killed_dir / "paused").exists():
            victim.kill()  # before communicate(): a hung worker would block it for ever
            raise AssertionError(f"the run did not pause: {victim.communicate()[1][-2000:]}")
        assert first_state.exists()
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        if victim.poll() is None:
            victim.kill()  # a failed check above must not leave the paused worker behind
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL, "the run must be killed, not finish"
    assert not (killed_dir / "result.json").exists()
    assert not (killed_dir / f"checkpoint-{MAX_STEPS}").exists(), "the kill must land mid-run"

    # a kill can also land while a checkpoint is being written: make sure one half-written folder (adapter
    # saved, trainer state not yet) sits after the last complete checkpoint, as such a kill leaves it
    last = latest_complete_checkpoint(killed_dir)
    assert last is not None
    last_step = int(last.rsplit("-", 1)[1])
    partial = killed_dir / f"checkpoint-{last_step + SAVE_STEPS}"
    if not partial.exists():
        partial.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(Path(last) / name, partial / name)

    resumed_log = finish(worker(killed_dir, "--resume"))
    finish(reference)
    assert "skipping incomplete checkpoint" in resumed_log

    expected, expected_tensors = result(reference_dir)
    got, got_tensors = result(killed_dir)
    assert expected["first_step"] == 1
    assert got["first_step"] == last_step + 1, "the resumed process must start after its checkpoint"
    assert sorted(got["losses"], key=int) == [str(s) for s in range(1, MAX_STEPS + 1)]
    for step, loss in expected["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-6, abs=1e-7), f"loss at step {step}"
    for key in ("eval_loss", "eval_accuracy"):
        assert got["eval"][key] == pytest.approx(expected["eval"][key], rel=1e-6, abs=1e-7), key
    assert got["rank_pattern"] == expected["rank_pattern"]
    assert got["rank_pattern"] and any(not all(keep) for keep in got["rank_pattern"].values()), (
        "AdaLoRA must have pruned during the run, or the comparison misses the allocator state"
    )
    assert expected_tensors.keys() == got_tensors.keys()
    for name, tensor in expected_tensors.items():
        torch.testing.assert_close(got_tensors[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    initial = load_file(Path(last) / "adalora_state.safetensors")
    moved = [k for k in expected_tensors if not torch.equal(initial[f"param:{k}"], expected_tensors[k])]
    assert moved, "the adapter must have trained after the checkpoint, or the comparison is empty"
