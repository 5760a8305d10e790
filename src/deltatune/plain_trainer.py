"""A deltatune model trained by plain ``transformers.Trainer``: what deltatune does about it by itself.

transformers recognises only peft's model classes (``Trainer._save``, ``_load_from_checkpoint``,
``_load_best_model``), so with plain ``Trainer`` a deltatune model would be saved as full-model checkpoints
(17x the adapter on the small ViT) and AdaLoRA would train without its rank allocation. At the model's first
training forward, :func:`adapt_plain_trainer` finds the ``Trainer`` running it (up the call stack) and, for a
plain ``transformers.Trainer`` (``_save`` not overridden), adapts that one instance:

- ``_save``: ``checkpoint-N`` and ``save_model`` folders get the adapter in PEFT's format plus
  ``model.safetensors`` holding only the trained tensors under the model's own names: the file transformers'
  own ``resume_from_checkpoint`` and ``load_best_model_at_end`` read back (``load_state_dict(strict=False)``);
- the method's training hooks run from a callback (AdaLoRA's budget allocation after each optimiser step,
  with ``total_step`` filled from the Trainer's planned steps);
- the "missing keys" warning of those reloads is limited to trained tensors (the frozen base is not in the
  file on purpose).

What stays different from ``deltatune.train.DeltaTrainer`` is said once, in a warning with the one-line fix.
``DeltaTrainer`` (``handles_deltatune_models = True``) is left alone.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from types import FrameType
from typing import Any

import torch

from .hooks import MethodHooks

logger = logging.getLogger(__name__)

__all__ = ["adapt_plain_trainer", "find_trainer"]

_FRAMES = 40


def find_trainer() -> Any:
    """The ``transformers.Trainer`` whose method is on the call stack, or None (no transformers imported, or
    a custom training loop)."""
    trainer_module = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(trainer_module, "Trainer", None)
    if trainer_cls is None:
        return None
    frame: FrameType | None = sys._getframe(1)
    for _ in range(_FRAMES):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, trainer_cls):
            return candidate
        frame = frame.f_back
    return None


def _trained_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _save_adapter(trainer: Any, output_dir: str | None = None, state_dict: Any = None) -> None:
    """``Trainer._save`` for a deltatune model: PEFT's adapter files and the trained tensors only."""
    from safetensors.torch import save_file

    from ._files import atomic_path

    folder = str(output_dir if output_dir is not None else trainer.args.output_dir)
    if not trainer.args.should_save:
        return
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    names = _trained_names(model)
    trained = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in names}
    with atomic_path(os.path.join(folder, "model.safetensors")) as tmp:
        save_file(trained, tmp, metadata={"format": "pt", "written_by": "deltatune"})
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(folder)


def _warn_trained_only(trainer: Any, original: Any, load_result: Any) -> None:
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    names = _trained_names(model)
    missing = [k for k in load_result.missing_keys if k in names]
    if missing or load_result.unexpected_keys:
        original(type(load_result)(missing, load_result.unexpected_keys))


def _hooks_callback(tuner: Any) -> Any:
    from transformers import TrainerCallback

    class HooksCallback(TrainerCallback):  # the method's training hooks, as DeltaTrainer runs them
        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not bool(getattr(kwargs.get("optimizer"), "step_was_skipped", False)):
                tuner.on_optimizer_step(state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tuner.training_summary()

    return HooksCallback()


def _human(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _size(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def adapt_plain_trainer(tuner: Any, model: torch.nn.Module | None = None) -> Any:
    """Called at the first training forward of ``tuner``: adapts a plain ``transformers.Trainer`` running it
    (see the module docstring) and warns once. Returns the Trainer found (None for a custom loop or
    ``DeltaTrainer``)."""
    trainer = find_trainer()
    if trainer is None or getattr(trainer, "handles_deltatune_models", False):
        return None
    import transformers

    base = transformers.Trainer
    cls = type(trainer)
    model = model if model is not None else trainer.accelerator.unwrap_model(trainer.model)
    done: list[str] = []
    if cls._save is base._save:
        trainer._save = functools.partial(_save_adapter, trainer)
        trainer._issue_warnings_after_load = functools.partial(
            _warn_trained_only, trainer, trainer._issue_warnings_after_load
        )
        full = _size(model.state_dict().values())
        adapter = _size(p for p in model.parameters() if p.requires_grad)
        done.append(
            f"its checkpoints hold the adapter and its trained tensors ({_human(adapter)}), not the whole "
            f"model ({_human(full)}), and transformers' resume_from_checkpoint and load_best_model_at_end "
            "read them back"
        )
    hooked = type(tuner).on_optimizer_step is not MethodHooks.on_optimizer_step
    if hooked and trainer.state.max_steps > 0:
        tuner.prepare_training(int(trainer.state.max_steps))
        trainer.add_callback(_hooks_callback(tuner))
        done.append("its method's training hooks (a rank allocation) run after each optimiser step")
    adapted = f"deltatune adapted this Trainer: {'; '.join(done)}. " if done else ""
    logger.warning(
        "a deltatune model is training under a plain transformers.Trainer, which knows only peft's model "
        "classes. %sStill different from deltatune's Trainer: a new process resuming from a checkpoint-N logs "
        "transformers' missing-keys warning and restores no method state beyond the adapter's tensors (a rank "
        "allocator's), and there is "
        "no NaN/inf guard, labels.json or default accuracy metric. The one-line fix: "
        "`from deltatune.train import DeltaTrainer as Trainer`",
        adapted,
    )
    return trainer
