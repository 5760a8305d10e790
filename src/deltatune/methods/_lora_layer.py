"""LoRA: low-rank adaptation (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    y = W x + s · B A dropout(x),   A ∈ R^{r×in}, B ∈ R^{out×r},   s = alpha / r  (alpha / √r with rsLoRA)

For a Conv2d, A is a conv with the base kernel (in → r) and B a 1×1 conv (r → out), so
ΔW[o, i, …] = s · Σ_k B[o, k] A[k, i, …].
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, PeftWarning, TargetSpec
from ..layer_types import CONV_TYPES, Conv1D, conv_groups, from_out_in, is_transposed
from ..layers import expect_config, kaiming_uniform_, module_bias, module_weight
from ._fused import is_plain, low_rank_add, low_rank_linear, low_rank_merge_pays, runs_hooks
from ._lora_base import CONV_VARIANTS, LINEAR_VARIANTS, FrozenWeightsMixin, LoraLayerBase
from ._lora_bdlora import bdlora_factor, dense_weight
from ._lora_variants import VariantTable
from .lora import LoraConfig

__all__ = [
    "FrozenWeightsMixin",
    "LoraBiasMergeError",
    "LoraLayer",
    "LoraLayerBase",
    "lora_delta_forward",
    "lora_delta_weight",
    "lora_scaling",
]


class LoraBiasMergeError(RuntimeError, ValueError):
    """``lora_bias`` cannot be merged into a layer without bias (a ``RuntimeError`` as in PEFT, and a
    ``ValueError`` as deltatune raised before)."""


# ---- pure maths ---------------------------------------------------------------------------------
def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / √r for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s · B A.

    Args:
        lora_a: (r, in) or, for a conv, (r, in, *kernel).
        lora_b: (out, r) or (out, r, 1, 1).
        scaling: s.

    Returns:
        (out, in) or (out, in, *kernel).
    """
    b2 = lora_b.reshape(lora_b.shape[0], lora_b.shape[1])
    a2 = lora_a.reshape(lora_a.shape[0], -1)
    return (b2 @ a2).reshape(lora_b.shape[0], *lora_a.shape[1:]) * scaling


def lora_delta_forward(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """s · B A x for a Linear: x (..., in) → (..., out), without forming ΔW."""
    return F.linear(F.linear(x, lora_a), lora_b) * scaling


# ---- layer --------------------------------------------------------------------------------------
def lora_conv_factors(base: nn.Module, r: int, lora_bias: bool, **kw: Any) -> tuple[nn.Module, nn.Module]:
    """(A, B) for a ConvNd base: A a conv with the base's kernel, stride, padding, dilation and padding mode
    (in → r, groups 1), B a 1×…×1 conv (r → out) with the base's groups.

    Raises:
        ValueError: when r is not a multiple of the base's groups (PEFT's rule).
    """
    conv: Any = base
    if r % conv.groups:
        raise ValueError(
            f"Targeting a {type(base).__name__} with groups={conv.groups} and rank {r}. Currently, support is "
            "limited to conv layers where the rank is divisible by groups. Either choose a different rank or do "
            "not target this specific layer."
        )
    ones = (1,) * len(conv.kernel_size)
    lora_a = type(base)(
        conv.in_channels,
        r,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=False,
        padding_mode=conv.padding_mode,
        **kw,
    )
    lora_b = type(base)(r, conv.out_channels, ones, ones, groups=conv.groups, bias=lora_bias, **kw)
    return lora_a, lora_b


class LoraLayer(LoraLayerBase):
    """Wraps a Linear, transformers ``Conv1D`` or ConvNd with LoRA adapters (``lora_A``/``lora_B`` module
    dicts); ``nn.Embedding`` and ``nn.MultiheadAttention`` are kinds of their own (:mod:`._lora_kinds`).

    For a Linear or Conv1D, ``lora_A[name]`` is Linear(in, r) and ``lora_B[name]`` Linear(r, out); for a
    ConvNd, ``lora_A[name]`` is a conv with the base's kernel, stride, padding and dilation (in → r) and
    ``lora_B[name]`` a 1×…×1 conv (r → out, the base's groups: a grouped conv cannot be merged).
    """

    repr_prefix: ClassVar[str] = "lora"

    adapter_param_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")
    other_param_names: ClassVar[tuple[str, ...]] = ("lora_dropout",)  # deleted with its adapter
    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (
        nn.Linear,
        Conv1D,
        *CONV_TYPES,
        nn.Embedding,
        nn.MultiheadAttention,
    )
    lora_A: nn.ModuleDict
    lora_B: nn.ModuleDict
    lora_dropout: nn.ModuleDict

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str | None = None,
        config: LoraConfig | None = None,
        r: int | None = None,
        lora_alpha: float | None = None,
    ) -> None:
        """Wraps ``base_layer``; with ``adapter_name`` (PEFT's ``Linear(base, name, config, r=..., lora_alpha=...)``),
        adds that adapter at once: ``config`` (default ``LoraConfig()``), its ``r`` and ``lora_alpha`` unless given."""
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        if adapter_name is not None:
            config = LoraConfig() if config is None else config
            rank, alpha = (
                config.r if r is None else r,
                config.lora_alpha if lora_alpha is None else lora_alpha,
            )
            self.add_adapter(adapter_name, TargetSpec("", (), config, {"r": rank, "alpha": alpha}))

    @property
    def lora_variants(self) -> VariantTable:
        """On a Linear or ``Conv1D``: DoRA, KaSA, aLoRA, BD-LoRA and MiCA; on a ConvNd: DoRA; else plain only."""
        if isinstance(self.base_layer, nn.Linear | Conv1D):
            return LINEAR_VARIANTS
        return CONV_VARIANTS if isinstance(self.base_layer, CONV_TYPES) else {(): None}

    @property
    def mergeable(self) -> bool:
        """False on a grouped conv: the LoRA term mixes channels across groups, which no grouped kernel holds."""
        return conv_groups(self.base_layer) == 1

    @property
    def fan_in_fan_out(self) -> bool:
        """True when the base stores its weight (in, out) (transformers ``Conv1D``)."""
        return is_transposed(self.base_layer)

    def update_layer(self, adapter_name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        config = expect_config(config, LoraConfig)
        base = self.base_layer
        kw = self._new_dtype_device()
        if config.lora_bias and self.base_bias is None:
            warnings.warn(
                f"`lora_bias=True` was passed but the targeted layer of type {type(base).__name__} has no bias. "
                "This means that merging LoRA weights won't be possible.",
                PeftWarning,
                stacklevel=4,
            )
        lora_a: nn.Module
        lora_b: nn.Module
        if isinstance(base, CONV_TYPES):
            if conv_groups(base) > 1:
                warnings.warn(
                    f"LoRA adapter added to {type(base).__name__} layer with groups > 1. Merging is not supported.",
                    stacklevel=4,
                )
            lora_a, lora_b = lora_conv_factors(base, r, config.lora_bias, **kw)
        elif isinstance(base, nn.Linear | Conv1D):
            self._check_fan_in_fan_out(config)
            in_dim, out_dim = self.in_features, self.out_features
            lora_a = nn.Linear(in_dim, r, bias=False, **kw)
            lora_b = nn.Linear(r, out_dim, bias=config.lora_bias, **kw)
        else:
            raise TypeError(f"LoraLayer adapts Linear, Conv1D and ConvNd layers, not {type(base).__name__}")
        self.lora_A[adapter_name] = lora_a
        self.lora_B[adapter_name] = lora_b
        self.lora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.r[adapter_name] = r
        self.scaling[adapter_name] = lora_scaling(alpha, r, config.use_rslora)
        self.reset_parameters(adapter_name, config.init_lora_weights, config.loftq_config)
        self._finish_update(adapter_name)

    def scale_for(self, r: int, alpha: float, config: Any) -> float:
        """s for rank ``r`` and ``alpha`` under ``config`` (rsLoRA or not); used by hot-swapping."""
        return lora_scaling(alpha, r, bool(config.use_rslora))

    def add_adapter(self, adapter_name: str, target: TargetSpec) -> None:
        """``update_layer``, then BD-LoRA's block-diagonal factor where ``use_bdlora`` names this module.

        Raises:
            ValueError: for a variant this layer does not support (:meth:`LoraLayerBase.add_adapter`), or see
                :func:`.bdlora_factor`.
        """
        super().add_adapter(adapter_name, target)
        options = getattr(target.config, "use_bdlora", None)
        if options is None:  # on a Linear or Conv1D only: lora_variants
            return
        lora_a, lora_b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        found = bdlora_factor(options, target.module_name, lora_a, lora_b)
        if found is not None:
            getattr(self, found[0])[adapter_name] = found[1]

    def _check_fan_in_fan_out(self, config: LoraConfig) -> None:
        """PEFT's correction of ``fan_in_fan_out`` to the layer's real layout, with its warning."""
        if config.fan_in_fan_out == self.fan_in_fan_out:
            return
        if self.fan_in_fan_out:
            message = "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."
        else:
            message = (
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out "
                "to False."
            )
        warnings.warn(message, stacklevel=5)
        config.fan_in_fan_out = self.fan_in_fan_out

    def reset_parameters(
        self, adapter_name: str, init: bool | str, loftq: dict[str, Any] | None = None
    ) -> None:
        """Initialises A and B as PEFT does for ``init_lora_weights`` (PiSSA, OLoRA, orthogonal and LoftQ, with
        ``loftq`` its options, in :mod:`._lora_init`, and CorDA in :mod:`._lora_corda`, which may rewrite the base
        weight; EVA: B = 0 and A as created, until ``initialize_lora_eva_weights`` sets it from data)."""
        if init in ("eva", "corda"):
            self._data_init(adapter_name, str(init))
            return
        if isinstance(init, str) and init != "gaussian":
            from ._lora_init import init_from_base

            init_from_base(
                self.base_layer,
                self.lora_A[adapter_name],
                self.lora_B[adapter_name],
                init,
                self.r[adapter_name],
                self.scaling[adapter_name],
                loftq,
            )
            if init == "mica":  # MiCA trains A only (PEFT's MiCALinearVariant)
                self.freeze_weight(adapter_name, "lora_B")
            return
        a, b = self.factor_weights(adapter_name)
        b_bias = module_bias(self.lora_B[adapter_name])
        with torch.no_grad():
            if init is False:
                kaiming_uniform_(a)
                kaiming_uniform_(b)
                if b_bias is not None:
                    bound = 1 / math.sqrt(b[0].numel())
                    nn.init.uniform_(b_bias, -bound, bound)
                return
            if init == "gaussian":
                nn.init.normal_(a, std=1 / self.r[adapter_name])
            else:
                kaiming_uniform_(a)
            nn.init.zeros_(b)
            if b_bias is not None:
                nn.init.zeros_(b_bias)

    def _data_init(self, adapter_name: str, init: str) -> None:
        """EVA's placeholder (B = 0, A from its creation, as in PEFT) or CorDA's initialisation.

        Raises:
            ValueError: on a layer other than Linear/``Conv1D`` (PEFT refuses these initialisers there too).
        """
        if init == "corda":
            from ._lora_corda import corda_init

            lora_a, lora_b = self.lora_A[adapter_name], self.lora_B[adapter_name]
            corda_init(self.base_layer, lora_a, lora_b, self.r[adapter_name], self.scaling[adapter_name])
            return
        if not isinstance(self.base_layer, nn.Linear | Conv1D):
            raise ValueError(
                f"init_lora_weights={init!r} supports Linear and Conv1D layers, not "
                f"{type(self.base_layer).__name__}; leave this layer out of target_modules or use another "
                "initialisation"
            )
        with torch.no_grad():
            nn.init.zeros_(self.factor_weights(adapter_name)[1])

    def factor_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) weights of ``adapter_name``: (r, in[, *kernel]) and (out, r[, 1, 1])."""
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        dense_a, dense_b = dense_weight(a), dense_weight(b)  # BD-LoRA's block-diagonal factors
        return (
            module_weight(a) if dense_a is None else dense_a,
            module_weight(b) if dense_b is None else dense_b,
        )

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in the base weight's layout ((in, out) for a Conv1D).

        Raises:
            NotImplementedError: for a grouped conv, whose LoRA term is no grouped kernel (it cannot be merged).
        """
        if conv_groups(self.base_layer) > 1:
            raise NotImplementedError(
                f"Merging is not supported for {type(self.base_layer).__name__} layers with groups > 1: the LoRA term "
                "mixes channels across groups, which a grouped kernel cannot hold"
            )
        a, b = self.factor_weights(adapter_name)
        compute = (
            torch.float32
            if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)
            else a.dtype
        )
        delta = lora_delta_weight(a.to(compute), b.to(compute), self.scaling[adapter_name])
        return from_out_in(self.base_layer, delta)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W += ΔW (and bias += s·B.bias with ``lora_bias``); see :meth:`AdapterLayer.merge`.

        Raises:
            ValueError: if an adapter has a ``lora_bias`` but the base layer has no bias to fold it into.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        if conv_groups(self.base_layer) > 1 and any(n in self.r for n in names):
            self.delta_weight(names[0])  # raises NotImplementedError, as PEFT does
        if self.base_bias is None:
            biased = [n for n in names if n in self.lora_B and module_bias(self.lora_B[n]) is not None]
            if biased:
                raise LoraBiasMergeError(
                    f"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias (adapters "
                    f"{biased}); keep them unmerged"
                )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def _merge_bias(self, adapter_name: str, sign: float) -> None:
        lora_bias, base_bias = module_bias(self.lora_B[adapter_name]), self.base_bias
        if lora_bias is not None and base_bias is not None:
            base_bias.data += sign * lora_bias.data.to(base_bias.dtype) * self.scaling[adapter_name]

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        x = self._cast_input_dtype(self.lora_dropout[adapter_name](x), module_weight(a).dtype)
        return b(a(x)) * self.scaling[adapter_name]

    def _dropout_p(self, adapter_name: str) -> float:
        drop = self.lora_dropout[adapter_name]
        return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0

    def _submodules_hooked(self, adapter_name: str) -> bool:
        """Whether ``lora_A``, ``lora_B`` or ``lora_dropout`` of ``adapter_name`` runs hooks when called (offloading,
        sharding, casting, debugging): the fast paths, which read their weights, then call them instead."""
        return runs_hooks(
            self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_dropout[adapter_name]
        )

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        # The base GEMM and the low-rank term, fused (see _fused.low_rank_linear).
        a_layer, b_layer = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if not isinstance(a_layer, nn.Linear) or module_bias(b_layer) is not None:
            return None
        if self._submodules_hooked(adapter_name):  # called by the generic path, so that their hooks run
            return None
        a_w, b_w = self.factor_weights(adapter_name)
        scale = self.scaling[adapter_name]
        if isinstance(scale, torch.Tensor):  # prepared for compiled hot-swapping: s folded into B
            b_w, scale = b_w * scale, 1.0
        p = self._dropout_p(adapter_name)
        needs_grad = torch.is_grad_enabled() and (a_w.requires_grad or b_w.requires_grad)
        plain = is_plain(self.base_layer, (nn.Linear,))
        if plain and p == 0 and low_rank_merge_pays(x, self.base_weight, a_w.shape[0], needs_grad):
            # Inference over many tokens: one GEMM with W + s B A (what merging computes), built by one addmm.
            weight = self.base_weight
            merged = torch.addmm(weight, b_w.to(weight.dtype), a_w.to(weight.dtype), alpha=scale)
            return self.base_forward_with_weight(x, merged, self.base_bias)
        return low_rank_linear(self.base_layer, x, a_w, b_w, scale, p)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        plain = isinstance(a, nn.Linear) and module_bias(b) is None and self.cast_input_dtype_enabled
        if not plain or self._submodules_hooked(adapter_name):
            return super().add_adapter_output(result, x, adapter_name)  # calls A and B, which run their hooks
        # One GEMM-accumulate (result + s · hidden Bᵀ); dropout, when on, runs inside without an N×in copy.
        a_w, b_w = self.factor_weights(adapter_name)
        scale = self.scaling[adapter_name]
        if isinstance(scale, torch.Tensor):  # prepared for compiled hot-swapping: s folded into B
            b_w, scale = b_w * scale, 1.0
        return low_rank_add(result, x, a_w, b_w, scale, self._dropout_p(adapter_name))
