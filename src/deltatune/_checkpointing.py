"""Gradient checkpointing on a wrapped model: inputs that require grad, so reentrant checkpointing passes a
gradient to the adapters (used by :class:`~deltatune.model.PeftModel`, ``PeftMixedModel`` and
:func:`~deltatune.helpers.prepare_model_for_kbit_training`)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["inputs_require_grad", "prepare_for_checkpointing"]


def _checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on (its newer name first: the old one warns)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def inputs_require_grad(model: nn.Module) -> None:
    """Makes the input embedding's output require grad, so reentrant checkpointing has a grad path."""
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
        return

    def require_grad(_module: nn.Module, _inputs: Any, output: Any) -> None:
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(require_grad)  # type: ignore[operator]


def prepare_for_checkpointing(model: nn.Module) -> None:
    """A model wrapped with gradient checkpointing already on gets inputs that require grad, as PEFT does:
    with reentrant checkpointing and a frozen input embedding (a vision or audio model, whose main input is
    not ``input_ids``), no checkpointed block would otherwise pass a gradient to its adapters. Quantised
    models are left to :func:`~deltatune.helpers.prepare_model_for_kbit_training`."""
    quantised = any(
        getattr(model, a, False) for a in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")
    )
    if quantised or not _checkpointing(model):
        return
    if callable(getattr(model, "enable_input_require_grads", None)) or callable(
        getattr(model, "get_input_embeddings", None)
    ):
        inputs_require_grad(model)
