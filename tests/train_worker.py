"""Training runs in their own processes, for tests/test_resume_ddp.py (not collected by pytest itself).

Two modes, both on the CPU with a tiny random ViT and synthetic data:

``python tests/train_worker.py resume OUT [--pause] [--resume]``
    One deterministic run (AdaLoRA, dropout on, checkpoints every 3 steps, 10 steps of a 12-step epoch).
    ``--pause`` stops one step after the first checkpoint (mid-epoch), writes ``OUT/paused`` and waits there
    until it is killed, so a test can SIGKILL it at that state however busy the machine is;
    ``--resume`` continues from the newest complete checkpoint in OUT. Writes ``OUT/result.json`` and
    ``OUT/final.safetensors`` (the trainable tensors).

``torchrun --nproc_per_node 2 tests/train_worker.py ddp OUT`` (or plain ``python``: the reference)
    Runs every scenario of :data:`SCENARIOS` with a global batch of 8 split over the processes (gloo
    backend), and has every rank write ``OUT/<scenario>/rank<R>.safetensors`` (its trainable tensors) and
    ``rank<R>.json`` (rank pattern, losses, eval loss, the step of a NaN failure).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import QUIET_CPU_ARGS, Blobs, tiny_vit

from deltatune import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from deltatune.train import DeltaTrainer, NonFiniteLossError, TrainingArguments

TARGETS = {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
GLOBAL_BATCH = 8
DDP_STEPS = 8
ADALORA = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": DDP_STEPS}

#: scenario → (config class, config kwargs, poison step for the NaN scenario or None, training arguments).
SCENARIOS: dict[str, tuple[type, dict[str, Any], int | None, dict[str, Any]]] = {
    # equality with the single-process run: no dropout, so every process draws the same nothing
    "lora": (LoraConfig, {"r": 4, "lora_alpha": 8}, None, {}),
    "loha": (LoHaConfig, {"r": 2, "alpha": 4}, None, {}),
    "lokr": (LoKrConfig, {"r": 2, "alpha": 4}, None, {}),
    "adalora": (AdaLoraConfig, ADALORA, None, {}),
    # the regulariser is added once per forward: its weight must not grow with processes or micro-batches
    "adalora_accum": (AdaLoraConfig, ADALORA, None, {"gradient_accumulation_steps": 2}),
    # must just complete with find_unused_parameters=False: a skipped module still reaches the graph
    "loha_dropout": (LoHaConfig, {"r": 2, "alpha": 4, "module_dropout": 0.5, "rank_dropout": 0.2}, None, {}),
    "lokr_dropout": (LoKrConfig, {"r": 2, "alpha": 4, "module_dropout": 0.5, "rank_dropout": 0.2}, None, {}),
    # inf in the last process's input at step 3: every process must stop there, before checkpoint-4
    "lora_nan": (LoraConfig, {"r": 4, "lora_alpha": 8}, 3, {"save_strategy": "steps", "save_steps": 2}),
}


def make_args(out: str, **kw: Any) -> TrainingArguments:
    values: dict[str, Any] = {
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        **QUIET_CPU_ARGS,
        "dataloader_num_workers": 0,
    }
    values.update(kw)
    return TrainingArguments(output_dir=out, **values)


def trainable_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def rank_pattern(model: PeftModel) -> dict[str, list[bool]] | None:
    current = getattr(model.base_model, "current_rank_pattern", None)
    return current() if current is not None else None


def losses(trainer: DeltaTrainer) -> dict[str, float]:
    return {str(e["step"]): float(e["loss"]) for e in trainer.state.log_history if "loss" in e}


# ---- resume mode --------------------------------------------------------------------------------
class PauseAfterCheckpoint(TrainerCallback):
    """One step after the first checkpoint, writes ``paused`` into the output folder and waits until the process
    is killed: a test SIGKILLs it mid-epoch at a known state, never racing the run to its end."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == args.save_steps + 1:
            open(os.path.join(args.output_dir, "paused"), "w").close()
            while True:
                time.sleep(0.05)


class FirstStep(TrainerCallback):
    """Records the first optimiser step (1-based) this process trains."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.step is None:
            self.step = state.global_step + 1


def run_resume(out: str, pause: bool, resume: bool) -> None:
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=2, deltaT=1, lora_dropout=0.1, **TARGETS)
    model = get_peft_model(tiny_vit(), config)
    args = make_args(
        out,
        max_steps=10,  # the epoch has 12 steps: the run ends mid-epoch too
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=3,
    )
    first = FirstStep()
    callbacks = [first, PauseAfterCheckpoint()] if pause else [first]
    trainer = DeltaTrainer(
        model, args, train_dataset=Blobs(48, 1), eval_dataset=Blobs(16, 2), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    metrics = trainer.evaluate()
    save_file(trainable_tensors(model), os.path.join(out, "final.safetensors"))
    record = {
        "eval": metrics,
        "losses": losses(trainer),
        "rank_pattern": rank_pattern(model),
        "first_step": first.step,
    }
    with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as fh:
        json.dump(record, fh)


# ---- ddp mode -----------------------------------------------------------------------------------
class PoisonInput(TrainerCallback):
    """Inf in the pixel values of one process during one optimiser step (1-based)."""

    def __init__(self, model: PeftModel, step: int, rank: int, world: int) -> None:
        self.step, self.enabled, self.active = step, rank == world - 1, False
        model.get_base_model().vit.embeddings.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        return (args[0] * float("inf"), *args[1:]) if self.active else None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.active = self.enabled and state.global_step + 1 == self.step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.active = False


def run_scenario(out: str, name: str) -> None:
    cls, kwargs, poison, extra = SCENARIOS[name]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model = get_peft_model(tiny_vit(), cls(**kwargs, **TARGETS))
    directory = os.path.join(out, name)
    args = make_args(
        os.path.join(directory, "trainer"),
        max_steps=DDP_STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        per_device_eval_batch_size=8,
        ddp_find_unused_parameters=False,  # strict: DDP fails on any parameter left out of a step's graph
        **extra,
        **({"ddp_backend": "gloo"} if world > 1 else {}),
    )
    trainer = DeltaTrainer(model, args, train_dataset=Blobs(64, 1), eval_dataset=Blobs(16, 2))
    assert args.world_size == world, (args.world_size, world)
    if poison:
        trainer.add_callback(PoisonInput(model, poison, rank, world))
    record: dict[str, Any] = {"world_size": world, "error_step": None}
    try:
        trainer.train()
        record["eval_loss"] = trainer.evaluate()["eval_loss"]
    except NonFiniteLossError as err:
        record["error_step"] = err.step
    record["losses"] = losses(trainer)
    record["rank_pattern"] = rank_pattern(model)
    record["global_step"] = trainer.state.global_step
    os.makedirs(directory, exist_ok=True)
    save_file(trainable_tensors(model), os.path.join(directory, f"rank{rank}.safetensors"))
    with open(os.path.join(directory, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(record, fh)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["resume", "ddp"])
    parser.add_argument("out")
    parser.add_argument("--pause", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    if options.mode == "resume":
        run_resume(options.out, options.pause, options.resume)
        return
    for name in options.scenarios:
        run_scenario(options.out, name)


if __name__ == "__main__":
    main(sys.argv[1:])
