"""NaN/inf loss: detected, reported with its step, training stopped, and the last good checkpoint kept;
a checkpoint a kill left half-written is never resumed from. Tiny random ViT, synthetic data, CPU only."""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import pytest
import torch
from tiny import QUIET_CPU_ARGS, Blobs, tiny_vit
from transformers import TrainerCallback

from deltatune import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from deltatune.train import DeltaTrainer, NonFiniteLossError, NonFiniteLossGuard, TrainingArguments
from deltatune.train.resume import latest_complete_checkpoint, resolve_resume_checkpoint

POISON_STEP = 5  # the optimiser step (1-based) whose input holds inf


def NoisyBlobs(n: int, seed: int) -> Blobs:
    return Blobs(n, seed, noise=1.0)


SAVE_STEPS = 3  # checkpoint-3 is good; step 6 would save the poisoned state


class PoisonInputAt(TrainerCallback):
    """Multiplies the pixel values by inf during optimiser step ``step`` (1-based) only, through a forward
    pre-hook on the base model (the data loader runs ahead of the step, so the data cannot be timed)."""

    def __init__(self, model: PeftModel, step: int) -> None:
        self.step, self.active = step, False
        model.get_base_model().vit.embeddings.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not self.active:
            return None
        return (args[0] * float("inf"), *args[1:])

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.active = state.global_step + 1 == self.step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.active = False


def configs() -> dict[str, Any]:
    return {
        "lora": LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]
        ),
        "adalora": AdaLoraConfig(
            init_r=4,
            target_r=2,
            tinit=1,
            tfinal=2,
            deltaT=1,
            total_step=10,
            target_modules=["query", "value"],
        ),
    }


def poisoned_trainer(out: str, method: str, **kw: Any) -> tuple[PeftModel, DeltaTrainer]:
    model = get_peft_model(tiny_vit(), configs()[method])
    values: dict[str, Any] = {
        "max_steps": 10,
        "save_strategy": "steps",
        "save_steps": SAVE_STEPS,
        "logging_steps": 100,  # nothing logs before the failure: the check before the save must catch it
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        **QUIET_CPU_ARGS,
    }
    args = TrainingArguments(output_dir=out, **{**values, **kw})
    trainer = DeltaTrainer(model, args, train_dataset=NoisyBlobs(64, 1))
    trainer.add_callback(PoisonInputAt(model, POISON_STEP))
    return model, trainer


def checkpoints(out: str) -> list[str]:
    return sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))


def assert_last_good_checkpoint_loads(out: str) -> None:
    assert checkpoints(out) == [f"checkpoint-{SAVE_STEPS}"], "nothing after the non-finite step may be saved"
    loaded = PeftModel.from_pretrained(tiny_vit(), os.path.join(out, f"checkpoint-{SAVE_STEPS}"))
    for name, tensor in loaded.state_dict().items():
        assert torch.isfinite(tensor).all(), name
    with torch.no_grad():
        logits = loaded(pixel_values=NoisyBlobs(4, 3).images).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_non_finite_loss_stops_before_the_next_save(
    tmp_path: Any, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    out = str(tmp_path)
    _, trainer = poisoned_trainer(out, method)
    with caplog.at_level(logging.ERROR), pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    err = info.value
    assert err.step == POISON_STEP
    message = str(err)
    assert f"loss became nan at step {POISON_STEP}" in message, message
    assert f"checkpoint-{SAVE_STEPS}" in message, "the error must point at the last good checkpoint"
    assert err.last_checkpoint == os.path.join(out, f"checkpoint-{SAVE_STEPS}")
    assert any(f"at step {POISON_STEP}" in r.getMessage() for r in caplog.records), "the error is also logged"
    assert trainer.state.global_step == 2 * SAVE_STEPS, "detected at the first save after the bad step"
    assert_last_good_checkpoint_loads(out)


def test_logging_step_reports_the_exact_step(tmp_path: Any) -> None:
    """With logging every 2 steps the check runs at step 6 at the latest; still the exact step is named,
    and transformers' logging_nan_inf_filter (which hides the NaN from the logged loss) changes nothing."""
    out = str(tmp_path)
    _, trainer = poisoned_trainer(out, "lora", logging_steps=2, save_steps=100, logging_nan_inf_filter=True)
    with pytest.raises(NonFiniteLossError, match=f"at step {POISON_STEP} "):
        trainer.train()
    assert trainer.state.global_step == 6
    assert all(entry.get("step", 0) < POISON_STEP for entry in trainer.state.log_history)


def test_checkpoint_of_non_finite_adapter_is_refused_without_the_guard(tmp_path: Any) -> None:
    """The backstop in ``DeltaTrainer._save_checkpoint``: even with the guard callback removed, the
    poisoned adapter never becomes a checkpoint."""
    out = str(tmp_path)
    _, trainer = poisoned_trainer(out, "lora")
    trainer.remove_callback(NonFiniteLossGuard)
    assert not any(isinstance(cb, NonFiniteLossGuard) for cb in trainer.callback_handler.callbacks)
    with pytest.raises(NonFiniteLossError, match=r"refusing to write checkpoint-6.*NaN/inf"):
        trainer.train()
    assert_last_good_checkpoint_loads(out)


def test_resume_skips_a_half_written_checkpoint(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    out = str(tmp_path)
    good = os.path.join(out, "checkpoint-3")
    os.makedirs(good)
    with open(os.path.join(good, "trainer_state.json"), "w", encoding="utf-8") as fh:
        json.dump({"global_step": 3}, fh)
    # a kill during the save of checkpoint-6 (adapter written, trainer state missing) and of checkpoint-9
    # (trainer state cut short)
    shutil.copytree(good, os.path.join(out, "checkpoint-6"))
    os.remove(os.path.join(out, "checkpoint-6", "trainer_state.json"))
    shutil.copytree(good, os.path.join(out, "checkpoint-9"))
    with open(os.path.join(out, "checkpoint-9", "trainer_state.json"), "w", encoding="utf-8") as fh:
        fh.write('{"global_st')
    with caplog.at_level(logging.WARNING):
        assert latest_complete_checkpoint(out) == good
        assert resolve_resume_checkpoint(out, True) == good
    assert sum("skipping incomplete checkpoint" in r.getMessage() for r in caplog.records) >= 2
    with pytest.raises(ValueError, match=r"checkpoint-6.*no trainer_state\.json.*resume from .*checkpoint-3"):
        resolve_resume_checkpoint(out, os.path.join(out, "checkpoint-6"))
    with pytest.raises(ValueError, match=r"unreadable"):
        resolve_resume_checkpoint(out, os.path.join(out, "checkpoint-9"))
    with pytest.raises(ValueError, match="no complete checkpoint-N"):
        resolve_resume_checkpoint(os.path.join(out, "elsewhere"), True)
    assert resolve_resume_checkpoint(out, None) is None
