"""The guide's code with plain ``transformers.Trainer`` and with ``DeltaTrainer`` (issue 16, item 8): what plain
``Trainer`` does with a deltatune model, the warning at its first training step, and ``DeltaTrainer``'s CPU
thread choice (the command line's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import QUIET_CPU_ARGS, Blobs, tiny_vit
from transformers import TrainerCallback

from deltatune import LoraConfig, get_peft_model
from deltatune.train import DeltaTrainer, TrainingArguments
from deltatune.train.arguments import cpu_threads


class Threads(TrainerCallback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seen.append(torch.get_num_threads())


def tiny_run(out: Path, **kwargs: Any) -> tuple[DeltaTrainer, Threads]:
    model = get_peft_model(
        tiny_vit(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    )
    args = TrainingArguments(
        str(out), max_steps=2, per_device_train_batch_size=4, save_strategy="no", **QUIET_CPU_ARGS
    )
    threads = Threads()
    return DeltaTrainer(model, args, train_dataset=Blobs(8, 1), callbacks=[threads], **kwargs), threads


def test_delta_trainer_on_a_cpu_picks_threads_as_the_command_line_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer, threads = tiny_run(tmp_path / "a")
        trainer.train()
        assert threads.seen == [1, 1], "a small model trains single-threaded on a CPU"
        assert torch.get_num_threads() == 2, "the caller's thread count is put back"
        trainer, threads = tiny_run(tmp_path / "b", num_threads=2)
        trainer.train()
        assert threads.seen == [2, 2], "an explicit num_threads wins"
        with cpu_threads(trainer.model, 2, True):  # the command line's --num_threads 2, around the trainer
            trainer, threads = tiny_run(tmp_path / "c")
            trainer.train()
        assert threads.seen == [2, 2], "the command line's choice stands"
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        trainer, threads = tiny_run(tmp_path / "d")
        trainer.train()
        assert threads.seen == [2, 2], "OMP_NUM_THREADS decides"
    finally:
        torch.set_num_threads(before)
