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


# ---- plain transformers.Trainer ---------------------------------------------------------------------------
def plain_trainer(out: Path, config: Any, steps: int = 4, **overrides: Any) -> Any:
    import transformers

    model = get_peft_model(tiny_vit(), config)
    settings = {
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "save_strategy": "steps",
        "save_steps": 2,
    }
    settings.update({"eval_strategy": "steps", "eval_steps": 2, "load_best_model_at_end": True, **overrides})
    args = transformers.TrainingArguments(str(out), **{**QUIET_CPU_ARGS, **settings})
    return transformers.Trainer(model, args, train_dataset=Blobs(16, 1), eval_dataset=Blobs(8, 2))


def lora() -> LoraConfig:
    return LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])


def trained_tensors(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_plain_trainer_writes_adapter_checkpoints_that_it_resumes_and_reloads_as_best(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from safetensors.torch import load_file

    from deltatune import PeftModel

    with caplog.at_level("WARNING", logger="deltatune"):
        trainer = plain_trainer(tmp_path, lora())
        trainer.train()
    warned = [r.getMessage() for r in caplog.records if "plain transformers.Trainer" in r.getMessage()]
    assert len(warned) == 1, "warned once, at the first training step"
    assert "DeltaTrainer as Trainer" in warned[0] and "not the whole model" in warned[0]
    model = trainer.model
    trained = trained_tensors(model)
    full = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        folder = tmp_path / checkpoint
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= names
        saved = load_file(folder / "model.safetensors")
        assert set(saved) == set(trained), "only the trained tensors, under the model's names"
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        assert weights < full / 4, f"{checkpoint}: {weights} bytes of weights for a {full}-byte model"
        PeftModel.from_pretrained(tiny_vit(), folder)  # the adapter loads as any deltatune/PEFT adapter
    best = trainer.state.best_model_checkpoint
    assert best is not None
    best_tensors = load_file(Path(best) / "model.safetensors")
    for name, value in trained.items():  # load_best_model_at_end reloaded the best checkpoint's tensors
        torch.testing.assert_close(value, best_tensors[name])
    caplog.clear()
    resumed = plain_trainer(tmp_path, lora(), steps=6)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert resumed.state.global_step == 6
    assert "missing keys" not in caplog.text.lower(), "frozen base weights are not reported missing"


def test_adalora_allocates_under_plain_trainer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from deltatune import AdaLoraConfig

    config = AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, target_modules=["query", "value"], total_step=None
    )
    with caplog.at_level("WARNING"):
        trainer = plain_trainer(tmp_path, config, steps=6, load_best_model_at_end=False)
        trainer.train()
    tuner = trainer.model.base_model
    assert tuner.peft_config["default"].total_step == 6, "total_step filled from the Trainer's plan"
    ranks = tuner.rank_summary()
    assert ranks and any(kept < 4 for kept in ranks.values()), f"no rank was pruned: {ranks}"
    assert "total_step is unset" not in caplog.text


def test_custom_loops_are_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    model = get_peft_model(tiny_vit(), lora())
    batch = Blobs(4, 1)
    with caplog.at_level("WARNING", logger="deltatune"):
        model.train()
        out = model(pixel_values=torch.stack([batch[i]["pixel_values"] for i in range(4)]))
        out.logits.sum().backward()
    assert "plain transformers.Trainer" not in caplog.text


def test_a_training_forward_before_train_does_not_stop_the_adaptation(tmp_path: Path) -> None:
    """A sanity-check forward in training mode (no Trainer on the stack) comes first: the Trainer that then
    trains the model is still adapted, and a second Trainer on the same model is adapted too."""
    import transformers

    trainer = plain_trainer(
        tmp_path / "one", lora(), steps=2, load_best_model_at_end=False, eval_strategy="no"
    )
    model = trainer.model
    batch = Blobs(4, 1)
    model.train()
    model(pixel_values=torch.stack([batch[i]["pixel_values"] for i in range(4)]))  # a custom forward first
    trainer.train()
    second = transformers.Trainer(
        model,
        trainer.args.__class__(
            str(tmp_path / "two"),
            **{
                **QUIET_CPU_ARGS,
                "max_steps": 2,
                "per_device_train_batch_size": 4,
                "save_strategy": "steps",
                "save_steps": 2,
            },
        ),
        train_dataset=Blobs(16, 1),
    )
    second.train()
    for folder in (tmp_path / "one" / "checkpoint-2", tmp_path / "two" / "checkpoint-2"):
        names = {p.name for p in folder.iterdir()}
        assert "adapter_model.safetensors" in names, f"{folder}: not an adapter checkpoint: {sorted(names)}"
        assert "training_args.bin" in names, "written as transformers writes it"


def test_an_adaptation_that_fails_is_one_warning_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from deltatune import plain_trainer as plain

    def broken(*args: Any, **kwargs: Any) -> list[str]:
        raise AttributeError("a transformers without Trainer._save")

    monkeypatch.setattr(plain, "_adapt", broken)
    with caplog.at_level("WARNING", logger="deltatune"):
        trainer = plain_trainer(tmp_path, lora(), steps=2, load_best_model_at_end=False, eval_strategy="no")
        trainer.train()  # the user's training goes on
    warned = [r.getMessage() for r in caplog.records if "could not adapt this Trainer" in r.getMessage()]
    assert len(warned) == 1 and "DeltaTrainer" in warned[0], caplog.text
    assert trainer.state.global_step == 2
