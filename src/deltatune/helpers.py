"""PEFT's helper functions around adapters: :func:`check_if_peft_model` (``peft.helpers``) and
:func:`prepare_model_for_kbit_training` (``peft.prepare_model_for_kbit_training``), same names, arguments and
results."""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import torch
from torch import nn

from .config import PeftConfig

__all__ = ["check_if_peft_model", "prepare_model_for_kbit_training"]

#: ``quantization_method`` values whose weights are not cast to float32 (their own storage; PEFT's list).
_KEEP_DTYPE_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")
#: The half-precision dtypes cast to float32 for stable training.
_HALF = (torch.float16, torch.bfloat16)


def check_if_peft_model(model_name_or_path: str | os.PathLike[str]) -> bool:
    """Whether ``model_name_or_path`` (a folder or a Hub id) holds a readable adapter config.

    Args:
        model_name_or_path: The folder or Hub repository to look at (a non-default adapter lives in the
            sub-folder named after it).

    Returns:
        True when an ``adapter_config.json`` is found there and is a valid adapter config, else False (never
        raises: a missing file, a broken config and an unreachable Hub all give False, as in PEFT).
    """
    try:
        PeftConfig.from_pretrained(os.fspath(model_name_or_path))
    except Exception:  # any failure to read a config means "not an adapter", as in PEFT
        return False
    return True


def _quantization(model: nn.Module) -> tuple[bool, bool]:
    """(loaded in 8 or 4 bits, quantised by a method that keeps its own dtype)."""
    kbit = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))
    method = getattr(model, "quantization_method", None)  # transformers' QuantizationMethod is a str Enum
    own_dtype = method in _KEEP_DTYPE_METHODS or bool(getattr(model, "hqq_quantized", False))
    return kbit, own_dtype


def _inputs_require_grad(model: nn.Module) -> None:
    """Makes the input embedding's output require grad, so reentrant checkpointing has a grad path."""
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
        return

    def require_grad(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(require_grad)  # type: ignore[operator]


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Prepares a (quantised) transformers model for adapter training, as PEFT does: every parameter frozen;
    float16/bfloat16 parameters cast to float32 (not 4-bit ``Params4bit`` nor the weights of GPTQ, AQLM, EETQ,
    torchao or HQQ models) and the accelerator's cache emptied after the cast; for a quantised model with
    ``use_gradient_checkpointing``, gradient checkpointing on, with the inputs made to require grad when it is
    reentrant.

    Args:
        model: The model (changed in place).
        use_gradient_checkpointing: Turn gradient checkpointing on (quantised models only).
        gradient_checkpointing_kwargs: Passed to ``model.gradient_checkpointing_enable`` (e.g.
            ``{"use_reentrant": False}``).
        auto_clear_cache: Empty the CUDA/XPU cache after the float32 casts.

    Returns:
        ``model``.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    kbit, own_dtype = _quantization(model)
    for param in model.parameters():
        param.requires_grad = False
    if not own_dtype:
        for param in model.parameters():
            if param.dtype in _HALF and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            xpu = getattr(torch, "xpu", None)
            if xpu is not None and xpu.is_available():
                xpu.empty_cache()
    if (kbit or own_dtype) and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):  # non-reentrant checkpointing needs no grad on the inputs
            _inputs_require_grad(model)
        enable: Any = model.gradient_checkpointing_enable
        if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
            enable(gradient_checkpointing_kwargs=kwargs)
        else:
            if kwargs:
                warnings.warn(
                    "gradient_checkpointing_kwargs is not supported by this model's gradient_checkpointing_enable "
                    f"(transformers too old); ignored: {kwargs}",
                    FutureWarning,
                    stacklevel=2,
                )
            enable()
    return model
