"""PEFT's helper functions around adapters: :func:`check_if_peft_model`, :func:`disable_input_dtype_casting`,
:class:`DoraCaching`, KappaTune's target selection (:class:`KappaTuneSelector`, :func:`find_kappa_target_modules`;
``peft.helpers``) and :func:`prepare_model_for_kbit_training` (``peft.prepare_model_for_kbit_training``), same
names, arguments and results."""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import torch
from torch import nn

from ._checkpointing import inputs_require_grad
from ._weight_cache import set_weight_caching, weight_caching_enabled
from .config import PeftConfig
from .layers import AdapterLayer

__all__ = [
    "DoraCaching",
    "KappaTuneSelector",
    "cast_mixed_precision_params",
    "check_if_peft_model",
    "disable_input_dtype_casting",
    "find_kappa_target_modules",
    "prepare_model_for_kbit_training",
]

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


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Within the context, the adapter layers of ``model`` leave their input's dtype as it is before the
    adapter's own products, instead of casting it to the adapter tensors' dtype (PEFT's
    ``peft.helpers.disable_input_dtype_casting``): for hooks that manage the dtypes themselves, such as
    diffusers' layerwise casting, which would otherwise meet an input cast to the stored dtype. Each layer's
    previous setting returns on leaving (nested contexts unwind in order).

    Args:
        model: The model whose adapter layers are switched (a ``PeftModel`` or any module holding them).
        active: False makes the context do nothing.
    """
    if not active:
        yield
        return
    previous = {}
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            previous[module] = module.cast_input_dtype_enabled
            module.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for module, enabled in previous.items():
            module.cast_input_dtype_enabled = enabled


class DoraCaching:
    """Caches DoRA's weight norms ‖W + ΔW‖ (the costly part of a DoRA layer's inference step) while the model
    is in eval mode (PEFT's ``peft.helpers.DoraCaching``). A context manager, or ``DoraCaching()(enabled=True)``
    to switch it on for good (``enabled=False`` off). The switch is process-wide.

    In training mode nothing is cached, even inside the context; ``model.train()`` and ``model.eval()`` empty
    every DoRA layer's cache (``_dora_cache``), and so does a forward with caching off. A cached norm is served
    only while the weights it came from are unchanged (merging, loading, switching adapters and in-place edits
    are seen; a write through ``tensor.data`` is not: call ``model.eval()`` after one).

    Example::

        model.eval()
        with DoraCaching():
            logits = model(inputs)  # later calls reuse the norms
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._previous: list[bool] = []

    def __enter__(self) -> DoraCaching:
        self._previous.append(weight_caching_enabled())
        set_weight_caching(self.enabled)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        set_weight_caching(self._previous.pop())

    def __call__(self, enabled: bool = True) -> None:
        """Switches DoRA caching on (``enabled=True``) or off for good."""
        set_weight_caching(enabled)


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Casts, in place, every frozen floating-point parameter of ``model`` to ``dtype`` (fp16 or bf16, the
    mixed-precision dtype) and every trainable one to fp32 (PEFT's ``cast_mixed_precision_params``): half the
    memory for the frozen base, full precision where the optimiser updates. Integer (quantised) weights are left
    as they are.

    Raises:
        ValueError: when ``dtype`` is not a floating-point dtype.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"cast_mixed_precision_params needs a floating-point dtype (e.g. torch.bfloat16), got {dtype!r}"
        )
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.float32 if param.requires_grad else dtype)


def _quantization(model: nn.Module) -> tuple[bool, bool]:
    """(loaded in 8 or 4 bits, quantised by a method that keeps its own dtype)."""
    kbit = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))
    method = getattr(model, "quantization_method", None)  # transformers' QuantizationMethod is a str Enum
    own_dtype = method in _KEEP_DTYPE_METHODS or bool(getattr(model, "hqq_quantized", False))
    return kbit, own_dtype


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
            inputs_require_grad(model)
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


#: Names of fused mixture-of-experts weights (experts, in, out) that KappaTune scores as ``target_parameters``.
MOE_PARAM_SUFFIXES = (".gate_up_proj", ".down_proj", ".gate_proj", ".up_proj")


def _condition_number(matrix: torch.Tensor) -> float:
    """σ_max / σ_min of a 2-D weight (float32 SVD; a tiny floor keeps a singular matrix finite)."""
    singular = torch.linalg.svdvals(matrix.detach().float().reshape(matrix.shape[0], -1))
    return float(singular[0] / (singular[-1] + 1e-8))


def _pick(
    scores: dict[str, float], top_p: float | None, num_modules: int | None, threshold: float | None
) -> list[str]:
    ranked = [name for name, _ in sorted(scores.items(), key=lambda item: item[1])]  # best conditioned first
    if num_modules is not None:
        return ranked[:num_modules]
    if top_p is not None:
        return ranked[: max(1, int(len(ranked) * top_p))] if ranked else []
    if threshold is not None:
        return [name for name in ranked if scores[name] <= threshold]
    return ranked


class KappaTuneSelector:
    """KappaTune's choice of what to adapt: the layers whose weights are best conditioned (lowest
    κ = σ_max / σ_min), which change least of what the model knows when tuned.

    Scores every ``nn.Linear`` (for ``target_modules``) and every fused mixture-of-experts weight, a 3-D
    parameter whose name ends in one of ``moe_param_suffixes`` (for ``target_parameters``; the experts' mean κ).
    Matrices with a side over ``max_dim_size_to_analyze`` are skipped (their SVD would take too long). The SVDs
    run once, on first use.
    """

    def __init__(
        self,
        model: nn.Module,
        max_dim_size_to_analyze: int = 16384,
        moe_param_suffixes: tuple[str, ...] | None = None,
        show_progress: bool = True,
    ) -> None:
        self.model = model
        self.max_dim_size_to_analyze = max_dim_size_to_analyze
        self.moe_param_suffixes = tuple(moe_param_suffixes or MOE_PARAM_SUFFIXES)
        self.show_progress = show_progress  # accepted for PEFT's signature; deltatune prints no progress bar
        self._modules: dict[str, float] | None = None
        self._parameters: dict[str, float] = {}

    def _scores(self) -> tuple[dict[str, float], dict[str, float]]:
        if self._modules is None:
            limit = self.max_dim_size_to_analyze
            self._modules = {
                name: _condition_number(module.weight)
                for name, module in self.model.named_modules()
                if isinstance(module, nn.Linear) and max(module.weight.shape) <= limit
            }
            self._parameters = {
                name: sum(_condition_number(expert) for expert in param) / param.shape[0]
                for name, param in self.model.named_parameters()
                if param.dim() == 3
                and name.endswith(self.moe_param_suffixes)
                and max(param.shape[1:]) <= limit
            }
        return self._modules, self._parameters

    def get_best_targets(
        self, top_p: float | None = None, num_modules: int | None = None, threshold: float | None = None
    ) -> list[str]:
        """The Linear layers' names, best conditioned first: the first ``num_modules``, or the best ``top_p``
        share (at least one), or those with κ ≤ ``threshold``; all of them without a limit."""
        return _pick(self._scores()[0], top_p, num_modules, threshold)

    def get_best_target_parameters(
        self, top_p: float | None = None, num_modules: int | None = None, threshold: float | None = None
    ) -> list[str]:
        """The same choice among the fused mixture-of-experts weights (names for ``target_parameters``)."""
        return _pick(self._scores()[1], top_p, num_modules, threshold)


def find_kappa_target_modules(
    model: nn.Module,
    top_p: float = 0.2,
    max_dim_size_to_analyze: int = 16384,
    moe_param_suffixes: tuple[str, ...] | None = None,
    show_progress: bool = True,
) -> dict[str, list[str] | None]:
    """KappaTune's targets in one call: ``{"target_modules": [...], "target_parameters": [...] or None}`` (None
    when the model has no fused mixture-of-experts weights), the best-conditioned ``top_p`` share of each, ready
    for ``LoraConfig(**find_kappa_target_modules(model))``."""
    selector = KappaTuneSelector(model, max_dim_size_to_analyze, moe_param_suffixes, show_progress)
    parameters = selector.get_best_target_parameters(top_p=top_p)
    return {"target_modules": selector.get_best_targets(top_p=top_p), "target_parameters": parameters or None}
