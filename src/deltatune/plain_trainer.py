"""A deltatune model trained by plain ``transformers.Trainer``: what deltatune does about it by itself.

transformers recognises only peft's model classes (``Trainer._save``, ``_load_from_checkpoint``,
``_load_best_model``), so with plain ``Trainer`` a deltatune model would be saved as full-model checkpoints
(17x the adapter on the small ViT) and AdaLoRA would train without its rank allocation. At the model's first
training forwards (a few at most without a Trainer: a sanity check or a custom loop first; again after an
adapted Trainer's training ends), and at a non-strict ``load_state_dict`` (a resume, which comes before any
forward), :func:`adapt_plain_trainer` finds the ``Trainer`` running it (up the call stack) and, for a plain ``transformers.Trainer`` (``_save`` not overridden), adapts that one instance:

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
import inspect
import logging
import os
import sys
import types
from types import FrameType
from typing import Any

import torch
from transformers import TrainerCallback

from .hooks import MethodHooks

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTED_KEY",
    "FILES_KEY",
    "INSPECTED_KEY",
    "TRAINER_WALKS",
    "WALKS_KEY",
    "AdapterHooksCallback",
    "BaseSignatureForward",
    "adapt_plain_trainer",
    "adapt_trainer_files",
    "find_trainer",
    "inspect_base_for_trainer",
    "mark_trainer_found",
    "tuner_of",
]

_FRAMES = 40
#: Training forwards in a row that look for a Trainer up the call stack before the model stops looking (a
#: sanity-check forward or a custom loop first); reset when an adapted Trainer's training ends.
TRAINER_WALKS = 3
#: Key in the tuner's ``__dict__``: how many training forwards looked (``TRAINER_WALKS`` once one was found).
WALKS_KEY = "_trainer_walks"
#: Key in a Trainer's ``__dict__``: deltatune adapted it (True) or tried and could not (False).
ADAPTED_KEY = "_deltatune_adapted"
#: Key in a Trainer's ``__dict__``: its label names were taken from the base model (:func:`inspect_base_for_trainer`).
INSPECTED_KEY = "_deltatune_inspected"
#: Key in a Trainer's ``__dict__``: its saving and checkpoint loading were adapted (:func:`adapt_trainer_files`).
FILES_KEY = "_deltatune_files_adapted"
#: The private parts of ``transformers.Trainer`` the adaptation replaces.
_PRIVATE = ("_save", "_issue_warnings_after_load", "_load_from_checkpoint")


def find_trainer(frames: int = _FRAMES) -> Any:
    """The ``transformers.Trainer`` whose method is on the call stack (within ``frames`` callers), or None (no
    transformers imported, or a custom training loop)."""
    trainer_module = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(trainer_module, "Trainer", None)
    if trainer_cls is None:
        return None
    frame: FrameType | None = sys._getframe(1)
    for _ in range(frames):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, trainer_cls):
            return candidate
        frame = frame.f_back
    return None


def mark_trainer_found(tuner: Any, found: bool) -> None:
    """Counts one look for a plain Trainer on ``tuner``; once one is found, or after
    :data:`TRAINER_WALKS` looks, training forwards stop walking the call stack."""
    walks = tuner.__dict__.get(WALKS_KEY, 0)
    tuner.__dict__[WALKS_KEY] = TRAINER_WALKS if found else walks + 1


def inspect_base_for_trainer(model: torch.nn.Module, base: torch.nn.Module) -> None:
    """Called by ``PeftModel.train``: a plain ``transformers.Trainer`` calling ``model.train()``/``model.eval()``
    (a few frames up) gets ``label_names`` (unless its arguments name them) and ``can_return_loss`` from the
    class of ``base``, once per Trainer.

    transformers takes them from the model's class at ``Trainer.__init__``, unwrapping peft's classes only; from
    ``PeftModel``'s ``forward(*args, **kwargs)`` it would find no labels, and evaluation would then compute no
    loss, collect no labels and call no ``compute_metrics``, silently. Both methods run before any batch of a
    training step or an evaluation loop, so every batch sees the base model's names, as with peft.
    """
    try:
        trainer = find_trainer(
            frames=6
        )  # training_step -> model.train(); evaluation_loop -> eval() -> train()
    except Exception:  # sys._getframe is CPython's; a frame's locals may refuse to be read
        return
    if trainer is None or getattr(trainer, "handles_deltatune_models", False):
        return
    if trainer.__dict__.get(INSPECTED_KEY) is not None or getattr(trainer, "model", None) is not model:
        return
    from transformers.utils import can_return_loss, find_labels

    trainer.__dict__[INSPECTED_KEY] = True
    if trainer.args.label_names is None:
        trainer.label_names = find_labels(type(base))
    trainer.can_return_loss = can_return_loss(type(base))


def _trained_names(model: torch.nn.Module) -> set[str]:
    """The ``state_dict()`` keys of the trained tensors (a DoRA magnitude's key is PEFT's, not its name)."""
    state = model.state_dict(keep_vars=True)
    return {k for k, v in state.items() if isinstance(v, torch.nn.Parameter) and v.requires_grad}


def _save_adapter(trainer: Any, output_dir: str | None = None, state_dict: Any = None) -> None:
    """``Trainer._save`` for a deltatune model: PEFT's adapter files, the trained tensors only (from
    ``state_dict`` when the Trainer passes one), and ``training_args.bin`` as transformers writes it."""
    from safetensors.torch import save_file
    from transformers.trainer import TRAINING_ARGS_NAME

    from ._files import atomic_path

    folder = str(output_dir if output_dir is not None else trainer.args.output_dir)
    if not trainer.args.should_save:
        return
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    names = _trained_names(model)
    source = state_dict if state_dict is not None else model.state_dict()
    trained = {k: v.detach().cpu().contiguous() for k, v in source.items() if k in names}
    with atomic_path(os.path.join(folder, "model.safetensors")) as tmp:
        save_file(trained, tmp, metadata={"format": "pt", "written_by": "deltatune"})
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(folder)
    torch.save(trainer.args, os.path.join(folder, TRAINING_ARGS_NAME))


def _load_checkpoint(trainer: Any, original: Any, resume_from_checkpoint: str, model: Any = None) -> None:
    """``Trainer._load_from_checkpoint`` for a deltatune model: a folder holding adapter files and no
    full-model file (peft's checkpoints) is read with ``load_adapter``, as transformers does for peft's models
    (it would look for a sharded checkpoint's index and fail); any other folder goes to transformers."""
    from transformers.trainer import ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME
    from transformers.utils import (
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
    )

    def has(folder: str, *names: str) -> bool:
        return any(os.path.isfile(os.path.join(folder, n)) for n in names)

    folder = str(resume_from_checkpoint)
    target = trainer.accelerator.unwrap_model(model if model is not None else trainer.model)
    adapter_files = (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)
    full = has(folder, SAFE_WEIGHTS_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)
    subdirs = sorted(
        n
        for n in (os.listdir(folder) if os.path.isdir(folder) else [])
        if has(os.path.join(folder, n), *adapter_files)
    )
    if full or not (has(folder, *adapter_files) or subdirs) or not hasattr(target, "load_adapter"):
        original(resume_from_checkpoint, model)
        return
    active = target.active_adapters[0]
    if has(folder, *adapter_files):
        target.load_adapter(folder, "default" if subdirs else active, is_trainable=True)
    for name in subdirs:
        target.load_adapter(os.path.join(folder, name), name, is_trainable=name == active)
    if subdirs:
        target.set_adapter(active)


def adapt_trainer_files(model: torch.nn.Module) -> None:
    """Called by ``PeftModel.to``: a plain ``transformers.Trainer`` moving the model (its ``__init__``) gets
    deltatune's ``_save`` and ``_load_from_checkpoint`` at once, so a ``save_model`` before any training
    forward (evaluate-only, save after loading) writes the adapter, and ``resume_from_checkpoint`` reads
    peft's adapter-only checkpoints (both run before the first forward, where :func:`adapt_plain_trainer`
    adapts the rest)."""
    try:
        trainer = find_trainer(frames=4)  # PeftModel.to <- Trainer._move_model_to_device
    except Exception:  # sys._getframe is CPython's; a frame's locals may refuse to be read
        return
    if (
        trainer is None
        or getattr(trainer, "handles_deltatune_models", False)
        or not hasattr(model, "save_pretrained")
    ):
        return
    import transformers

    if all(hasattr(transformers.Trainer, name) for name in _PRIVATE):
        _install_file_methods(trainer)


def _install_file_methods(trainer: Any) -> bool:
    """Replaces this instance's ``_save``, its after-load warning and ``_load_from_checkpoint`` where its class
    keeps transformers' own; once per Trainer. Returns whether its saving is deltatune's."""
    import transformers

    base, cls = transformers.Trainer, type(trainer)
    if cls._save is not base._save:
        return False
    if not trainer.__dict__.get(FILES_KEY):
        trainer.__dict__[FILES_KEY] = True
        trainer._save = functools.partial(_save_adapter, trainer)
        trainer._issue_warnings_after_load = functools.partial(
            _warn_trained_only, trainer, trainer._issue_warnings_after_load
        )
        if cls._load_from_checkpoint is base._load_from_checkpoint:
            trainer._load_from_checkpoint = functools.partial(
                _load_checkpoint, trainer, trainer._load_from_checkpoint
            )
    return True


def _warn_trained_only(trainer: Any, original: Any, load_result: Any) -> None:
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    names = _trained_names(model)
    missing = [k for k in load_result.missing_keys if k in names]
    if missing or load_result.unexpected_keys:
        original(type(load_result)(missing, load_result.unexpected_keys))


class AdapterHooksCallback(TrainerCallback):
    """Calls the tuner's training hooks; ``DeltaTrainer`` adds it for every deltatune model, and a plain
    ``transformers.Trainer`` gets it when :func:`adapt_plain_trainer` adapts it.

    - ``on_train_begin``: ``prepare_training(state.max_steps)`` (AdaLoRA fills ``total_step`` and checks its
      schedule there);
    - ``on_optimizer_step``: ``on_optimizer_step(state.global_step)`` while gradients exist (AdaLoRA's
      ``update_and_allocate``); a step an fp16 scaler skipped is logged and not passed on;
    - ``on_train_end``: ``training_summary()`` (logged by the method; kept as :attr:`summary`), and the
      model looks for the Trainer running it again at its next training forward (a next Trainer is adapted).

    Args:
        model: The model to drive; when None, the ``model`` the Trainer passes to callbacks is used.
    """

    def __init__(self, model: Any = None) -> None:
        self.model = model
        self.summary: dict[str, Any] = {}

    def _tuner(self, kwargs: dict[str, Any]) -> Any:
        return tuner_of(self.model if self.model is not None else kwargs.get("model"))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tuner = self._tuner(kwargs)
        if tuner is not None:
            tuner.prepare_training(int(state.max_steps))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tuner = self._tuner(kwargs)
        if tuner is None:
            return
        # fp16: a GradScaler skips the step when a gradient overflowed; those gradients hold inf/NaN and
        # must not reach the method (AdaLoRA would fold them into its importance scores for good).
        # accelerate knows already (it read the scale to decide), so asking costs no device sync.
        if bool(getattr(kwargs.get("optimizer"), "step_was_skipped", False)):
            logger.info(
                "optimizer step %d was skipped (gradient overflow): no adapter update", state.global_step
            )
            return
        tuner.on_optimizer_step(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tuner = self._tuner(kwargs)
        if tuner is not None:
            self.summary = tuner.training_summary()
            tuner.__dict__.pop(WALKS_KEY, None)  # a next Trainer on this model is looked for again


def tuner_of(model: Any) -> Any:
    """The tuner of a deltatune model (a ``PeftModel``, whose ``base_model`` is the tuner, or the tuner
    itself), else None. Tuners are told by their hooks base (this module sits below ``tuner`` and ``model``)."""
    if isinstance(model, MethodHooks) and isinstance(model, torch.nn.Module):
        return model
    base = model._modules.get("base_model") if isinstance(model, torch.nn.Module) else None
    return base if isinstance(base, MethodHooks) else None


def _human(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _size(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def adapt_plain_trainer(tuner: Any, model: torch.nn.Module | None = None) -> Any:
    """Called at the first training forwards of ``tuner``: adapts a plain ``transformers.Trainer`` running it
    (see the module docstring) and warns once. Returns the Trainer found (adapted now or before, or one
    that could not be adapted), else None (a custom loop, ``DeltaTrainer``).

    Each instance is adapted once (marked with :data:`ADAPTED_KEY`), so a second Trainer on the same model is
    adapted too. The adaptation uses private parts of transformers (the call stack, ``Trainer._save``,
    ``Trainer._issue_warnings_after_load``); where they are missing or it fails, one warning says so and the
    user's forward goes on.
    """
    try:
        trainer = find_trainer()
    except Exception:  # sys._getframe is CPython's; a frame's locals may refuse to be read
        return None
    if trainer is None or getattr(trainer, "handles_deltatune_models", False):
        return None
    if ADAPTED_KEY in trainer.__dict__:
        return trainer
    trainer.__dict__[ADAPTED_KEY] = False
    try:
        import transformers

        missing = [name for name in _PRIVATE if not hasattr(transformers.Trainer, name)]
        if missing:
            raise AttributeError(f"this transformers' Trainer has no {', '.join(missing)}")
        done = _adapt(trainer, tuner, model)
    except Exception as err:
        logger.warning(
            "a deltatune model is training under a plain transformers.Trainer and deltatune could not adapt "
            "this Trainer (%s: %s): its checkpoints may hold the whole model and a method's training hooks do "
            "not run. Use DeltaTrainer: `from deltatune.train import DeltaTrainer as Trainer`",
            type(err).__name__,
            err,
        )
        return trainer
    trainer.__dict__[ADAPTED_KEY] = True
    adapted = f"deltatune adapted this Trainer: {'; '.join(done)}. " if done else ""
    logger.warning(
        "a deltatune model is training under a plain transformers.Trainer, which knows only peft's model "
        "classes. %sStill different from deltatune's Trainer: a resume restores no method state beyond the "
        "adapter's tensors (a rank allocator's), and there is "
        "no NaN/inf guard, labels.json or default accuracy metric. The one-line fix: "
        "`from deltatune.train import DeltaTrainer as Trainer`",
        adapted,
    )
    return trainer


def _adapt(trainer: Any, tuner: Any, model: torch.nn.Module | None) -> list[str]:
    model = model if model is not None else trainer.accelerator.unwrap_model(trainer.model)
    saved = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    done: list[str] = []
    if hasattr(saved, "save_pretrained") and _install_file_methods(trainer):
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
        done.append("its method's training hooks (a rank allocation) run after each optimiser step")
    trainer.add_callback(AdapterHooksCallback(tuner))  # the hooks; and a next Trainer is looked for
    return done


_SIGNED: dict[tuple[Any, type], Any] = {}


def _signed_copy(func: Any, base_cls: type) -> Any:
    """``func`` as a new function whose signature is ``base_cls.forward``'s plus ``adapter_names`` (cached)."""
    key = (func, base_cls)
    if key not in _SIGNED:
        copy = types.FunctionType(
            func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__
        )
        copy.__kwdefaults__ = func.__kwdefaults__
        copy.__qualname__, copy.__doc__, copy.__module__ = func.__qualname__, func.__doc__, func.__module__
        try:
            params = list(inspect.signature(base_cls.forward).parameters.values())  # type: ignore[attr-defined]
            extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
            last = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
            rest = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
            if not any(p.name == extra.name for p in params):
                rest.append(extra)
            setattr(copy, "__signature__", inspect.Signature(rest + last))  # noqa: B010
        except (TypeError, ValueError):  # a forward without a signature: keep PeftModel's
            copy = func
        _SIGNED[key] = copy
    return _SIGNED[key]


class BaseSignatureForward:
    """Descriptor for ``PeftModel.forward``: on an instance, the bound method carries the wrapped model's
    signature (plus ``adapter_names``), as transformers sees it through peft's classes; a plain
    ``transformers.Trainer``'s ``remove_unused_columns`` (its default) keeps the inputs the base model takes
    instead of dropping every column for ``(*args, **kwargs)``. On the class, it is the function itself."""

    def __init__(self, func: Any) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self.func
        base = getattr(obj.__dict__.get("_modules", {}).get("base_model"), "model", None)
        func = self.func if base is None else _signed_copy(self.func, type(base))
        return types.MethodType(func, obj)
