"""The hooks through which a method adds behaviour to the tuner; generic code calls these, never a method's name.

Every hook has a no-op default here. A method that needs one subclasses :class:`~deltatune.tuner.AdapterModel`
(which inherits :class:`MethodHooks`) and names that class (``tuner="module:Class"``) in its registry entry. Who calls
each hook:

- the tuner: :meth:`~MethodHooks.check_new_adapter`, :meth:`~MethodHooks.prepare_model`,
  :meth:`~MethodHooks.targets_beyond_modules`,
  :meth:`~MethodHooks.after_inject`,
  :meth:`~MethodHooks.extra_trainable_parameters`, :meth:`~MethodHooks.extra_loss` (added to a returned
  loss in training, as PEFT does, so plain loops get it);
- saving and loading (:mod:`deltatune.serialization`, :class:`~deltatune.PeftModel`):
  :meth:`~MethodHooks.prepare_save`, :meth:`~MethodHooks.before_export`,
  :meth:`~MethodHooks.export_layer_tensors`, :meth:`~MethodHooks.extra_saved_tensors`,
  :meth:`~MethodHooks.convert_initial_adapter`, :meth:`~MethodHooks.adapt_loaded_tensors`;
- the Trainer (:mod:`deltatune.train`): :meth:`~MethodHooks.prepare_training`,
  :meth:`~MethodHooks.on_optimizer_step`, :meth:`~MethodHooks.training_summary`,
  :meth:`~MethodHooks.checkpoint_state` / :meth:`~MethodHooks.load_checkpoint_state`;
- the run record and reports: :meth:`~MethodHooks.rank_summary`, :meth:`~MethodHooks.training_summary`.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from .config import TargetingConfig
from .layers import AdapterLayer

__all__ = ["MethodHooks", "warn_untied_embedding"]

#: The module names PEFT treats as (possibly tied) embeddings.
_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def _names_embedding(entries: Any) -> bool:
    """Whether ``target_modules``/``modules_to_save`` names an embedding (by the last name, or a regex)."""
    if isinstance(entries, str):
        return any(re.fullmatch(entries, name) for name in _EMBEDDING_NAMES)
    return any(str(m).split(".")[-1] in _EMBEDDING_NAMES for m in entries or ())


def warn_untied_embedding(model: nn.Module, config: TargetingConfig) -> None:
    """PEFT's warning: the model ties its output layer to its input embedding, the adapter takes one of them,
    and the method has no way to keep the two adapters tied."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", None) is False:
        return
    if not (_names_embedding(config.target_modules) or _names_embedding(config.modules_to_save)):
        return
    try:
        inputs = model.get_input_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        return
    weight = getattr(inputs, "weight", None)
    tied = weight is not None and any(
        m is not inputs and getattr(m, "weight", None) is weight for m in model.modules()
    )
    if tied:
        warnings.warn(
            "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but no implementation "
            "exists to tie the adapters. This can lead to complications, for example when merging the adapter or "
            "converting your model to formats other than safetensors (see "
            "https://github.com/huggingface/peft/issues/2777); a method with `ensure_weight_tying` ties them.",
            UserWarning,
            stacklevel=5,
        )


class MethodHooks:
    """No-op defaults of every hook a method may override."""

    #: File in a Trainer checkpoint that holds :meth:`checkpoint_state` (None: the method has none).
    CHECKPOINT_STATE_FILE: ClassVar[str | None] = None

    def check_new_adapter(self, adapter_name: str, config: TargetingConfig) -> None:
        """Raises ``ValueError`` before anything is injected when ``config`` cannot be added here. The default
        gives PEFT's warning when a method that cannot tie adapters (no ``ensure_weight_tying``) adapts or saves
        a tied embedding."""
        model = getattr(self, "model", None)
        if isinstance(model, nn.Module) and not hasattr(config, "ensure_weight_tying"):
            warn_untied_embedding(model, config)

    def generation_context(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> contextlib.AbstractContextManager[None]:
        """Wraps a ``generate`` call with these arguments (aLoRA: the positions its adapter applies to)."""
        return contextlib.nullcontext()

    def prepare_model(self, config: TargetingConfig) -> None:
        """Changes the model's structure before the targets of ``config`` are matched (LoRA's
        ``layer_replication``)."""

    def targets_beyond_modules(self, config: TargetingConfig) -> bool:
        """Whether ``config`` also targets something other than modules (LoRA's ``target_parameters``), so that
        matching no module is not an error."""
        return False

    def after_inject(self, adapter_name: str, config: TargetingConfig) -> None:
        """Runs once the adapter's layers exist (e.g. shrink them to a saved rank pattern before loading)."""

    def extra_trainable_parameters(self, adapter_name: str) -> Iterable[nn.Parameter]:
        """Parameters outside the adapter layers that train with ``adapter_name`` (e.g. LoRA's biases)."""
        return ()

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to the model's loss in training (e.g. AdaLoRA's orthogonal regulariser), or None."""
        return None

    def prepare_training(self, planned_steps: int) -> None:
        """Called before the first step of a run of ``planned_steps`` optimiser steps."""

    def on_optimizer_step(self, global_step: int) -> None:
        """Called after each optimiser step while the gradients still exist (``global_step`` is 0-based)."""

    def training_summary(self) -> dict[str, Any]:
        """What to report about the adapter after training (logged, and kept in the run's metrics)."""
        return {}

    def rank_summary(self, adapter_name: str | None = None) -> dict[str, int] | None:
        """Module → rank, for methods whose ranks change during training (None: fixed ranks)."""
        return None

    def prepare_save(self, adapter_name: str) -> None:
        """Called by ``save_pretrained`` before ``adapter_name`` is written (e.g. to warn about its config)."""

    def convert_initial_adapter(
        self, tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], config: TargetingConfig
    ) -> tuple[dict[str, torch.Tensor], TargetingConfig, TargetingConfig]:
        """For ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``: the saved tensors and
        config of an adapter that rewrote the base weight, converted to one on the original base (PiSSA, OLoRA),
        and the config to write into the initial adapter's folder.

        Raises:
            ValueError: for a method that has no such conversion (the default).
        """
        raise ValueError(
            f"path_initial_model_for_weight_conversion is not supported for {config.peft_type} adapters: only "
            "adapters whose initialisation rewrites the base weights can be converted"
        )

    def before_export(self, adapter_name: str) -> None:
        """Called before the tensors of ``adapter_name`` are collected for saving (e.g. to bring its config's
        rank pattern up to date)."""

    def export_layer_tensors(
        self, module_name: str, layer: AdapterLayer, adapter_name: str
    ) -> dict[str, Any]:
        """The tensors saved for one layer, named relative to it (``lora_A.weight``); methods may slice them."""
        return layer.export_tensors(adapter_name)

    def extra_saved_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Further tensors saved with the adapter, keyed by their name in the user's model."""
        return {}

    def adapt_loaded_tensors(
        self, tensors: dict[str, torch.Tensor], adapter_name: str, saved_config: TargetingConfig | None
    ) -> dict[str, torch.Tensor]:
        """Saved tensors made to fit the live adapter before they are copied in (e.g. re-expanding ranks)."""
        return tensors

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Extra state a Trainer checkpoint must hold to resume exactly (written to
        :attr:`CHECKPOINT_STATE_FILE`); empty when the adapter files suffice."""
        return {}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], saved_config: TargetingConfig) -> None:
        """Restores what :meth:`checkpoint_state` wrote."""
