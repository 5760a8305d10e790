"""LoRA: low-rank adaptation (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    y = W x + s · B A dropout(x),   A ∈ R^{r×in}, B ∈ R^{out×r},   s = alpha / r  (alpha / √r with rsLoRA)

For a Conv2d, A is a conv with the base kernel (in → r) and B a 1×1 conv (r → out), so
ΔW[o, i, …] = s · Σ_k B[o, k] A[k, i, …].
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, check_choice, check_range
from ..layers import AdapterLayer, expect_config, kaiming_uniform_, module_bias, module_weight
from ..registry import MethodSpec, register_method
from ..tuner import AdapterModel
from ._fused import is_plain, low_rank_add, low_rank_linear, low_rank_merge_pays

__all__ = ["LoraConfig", "LoraLayer", "LoraModel", "lora_delta_forward", "lora_delta_weight"]

INIT_CHOICES = (True, False, "gaussian")
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig(AdapterConfig):
    """Configuration of LoRA (same fields, defaults and JSON keys as PEFT's ``LoraConfig``).

    Attributes:
        r: Rank (default 8).
        lora_alpha: Scale numerator; s = lora_alpha / r (default 8).
        lora_dropout: Dropout on the adapter's input, in [0, 1) (default 0).
        fan_in_fan_out: True when the base weight is stored (in, out) (transformers ``Conv1D``).
        bias: Which biases train: ``"none"``, ``"all"`` or ``"lora_only"`` (targeted layers only).
        use_rslora: Use s = lora_alpha / √r.
        init_lora_weights: ``True`` (A kaiming-uniform, B = 0), ``"gaussian"`` (A ~ N(0, 1/r²), B = 0) or
            ``False`` (both random: the adapter starts as a non-zero delta).
        lora_bias: Give B a trainable bias.
        use_dora: Weight-decomposed LoRA (DoRA): handled by the ``dora`` method (:mod:`deltatune.methods.dora`).

    The remaining fields exist so that configs written by PEFT round-trip unchanged; values other
    than their defaults are rejected with a clear error when they would change behaviour.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    megatron_config: dict[str, Any] | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: Any = None
    loftq_config: dict[str, Any] = field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    use_dora: bool = False
    velora_config: Any = None
    alora_invocation_tokens: Any = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: Any = None
    lora_bias: bool = False
    target_parameters: Any = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False

    ALPHA_FIELD: ClassVar[str] = "lora_alpha"
    DROPOUT_FIELD: ClassVar[str | None] = "lora_dropout"
    RECIPE_DEFAULTS: ClassVar[dict[str, Any]] = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.1}
    #: Fields that select a variant of LoRA implemented by another registered method (PEFT's DoRA flag).
    VARIANT_FLAGS: ClassVar[tuple[str, ...]] = ("use_dora",)
    PEFT_TYPE: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("lora_dropout", self.lora_dropout, 0, 1)
        check_choice("bias", self.bias, BIAS_CHOICES)
        check_choice("init_lora_weights", self.init_lora_weights, INIT_CHOICES)
        unsupported = {
            "use_qalora": self.use_qalora,
            "loftq_config": self.loftq_config,
            "eva_config": self.eva_config,
            "corda_config": self.corda_config,
            "lora_ga_config": self.lora_ga_config,
            "velora_config": self.velora_config,
            "monteclora_config": self.monteclora_config,
            "megatron_config": self.megatron_config,
            "layer_replication": self.layer_replication,
            "target_parameters": self.target_parameters,
            "trainable_token_indices": self.trainable_token_indices,
            "alora_invocation_tokens": self.alora_invocation_tokens,
            "arrow_config": self.arrow_config,
            "kasa_config": self.kasa_config,
            "use_bdlora": self.use_bdlora,
        }
        used = [k for k, v in unsupported.items() if v]
        if used:
            raise ValueError(
                f"{', '.join(used)} {'is' if len(used) == 1 else 'are'} not supported by deltatune's "
                f"{type(self).__name__}; supported options: r, lora_alpha, lora_dropout, target_modules, "
                "exclude_modules, modules_to_save, bias, use_rslora, init_lora_weights, lora_bias, "
                "fan_in_fan_out, rank_pattern, alpha_pattern, layers_to_transform, layers_pattern, "
                + ", ".join(self.VARIANT_FLAGS)
            )

    @property
    def selects_variant(self) -> bool:
        """True when a variant flag (``use_dora``) is set: another registered method handles this config."""
        return any(getattr(self, flag, False) for flag in self.VARIANT_FLAGS)


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
def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's (height, width) setting as the 2-tuple ``nn.Conv2d`` takes."""
    return values[0], values[1]


class LoraLayer(AdapterLayer):
    """Wraps a Linear or Conv2d with LoRA adapters (``lora_A``/``lora_B`` module dicts).

    For a Linear, ``lora_A[name]`` is Linear(in, r) and ``lora_B[name]`` Linear(r, out); for a Conv2d,
    ``lora_A[name]`` is a conv with the base's kernel, stride, padding and dilation (in → r) and
    ``lora_B[name]`` a 1×1 conv (r → out).
    """

    adapter_param_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")
    lora_A: nn.ModuleDict
    lora_B: nn.ModuleDict
    lora_dropout: nn.ModuleDict

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        config = expect_config(config, LoraConfig)
        base = self.base_layer
        kw = self._new_dtype_device()
        lora_a: nn.Module
        lora_b: nn.Module
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError(
                    f"LoRA cannot adapt a grouped Conv2d (groups={base.groups}); use LoHa or LoKr"
                )
            padding = base.padding if isinstance(base.padding, str) else _pair(base.padding)
            lora_a = nn.Conv2d(
                base.in_channels,
                r,
                _pair(base.kernel_size),
                _pair(base.stride),
                padding,
                _pair(base.dilation),
                bias=False,
                padding_mode=base.padding_mode,
                **kw,
            )
            lora_b = nn.Conv2d(r, base.out_channels, 1, 1, bias=config.lora_bias, **kw)
        elif isinstance(base, nn.Linear):
            if config.fan_in_fan_out:  # as PEFT: an nn.Linear stores (out, in), so the flag cannot apply
                warnings.warn(
                    "fan_in_fan_out=True, but the target is an nn.Linear whose weight is (out, in); "
                    "setting fan_in_fan_out=False",
                    stacklevel=4,
                )
                config.fan_in_fan_out = False
            lora_a = nn.Linear(base.in_features, r, bias=False, **kw)
            lora_b = nn.Linear(r, base.out_features, bias=config.lora_bias, **kw)
        else:
            raise TypeError(f"LoRA adapts Linear and Conv2d layers, not {type(base).__name__}")
        self.lora_A[adapter_name] = lora_a
        self.lora_B[adapter_name] = lora_b
        self.lora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.r[adapter_name] = r
        self.scaling[adapter_name] = lora_scaling(alpha, r, config.use_rslora)
        self.reset_parameters(adapter_name, config.init_lora_weights)
        self._finish_update(adapter_name)

    def reset_parameters(self, adapter_name: str, init: bool | str) -> None:
        """Initialises A and B as PEFT does for ``init_lora_weights``."""
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

    def factor_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) weights of ``adapter_name``: (r, in[, *kernel]) and (out, r[, 1, 1])."""
        return module_weight(self.lora_A[adapter_name]), module_weight(self.lora_B[adapter_name])

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factor_weights(adapter_name)
        compute = (
            torch.float32
            if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)
            else a.dtype
        )
        return lora_delta_weight(a.to(compute), b.to(compute), self.scaling[adapter_name])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W += ΔW (and bias += s·B.bias with ``lora_bias``); see :meth:`AdapterLayer.merge`.

        Raises:
            ValueError: if an adapter has a ``lora_bias`` but the base layer has no bias to fold it into.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        if self.base_bias is None:
            biased = [n for n in names if n in self.lora_B and module_bias(self.lora_B[n]) is not None]
            if biased:
                raise ValueError(
                    f"cannot merge adapter(s) {biased}: they have lora_bias=True but the base layer has no "
                    "bias to fold it into; keep the adapter unmerged"
                )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def _merge_bias(self, adapter_name: str, sign: float) -> None:
        lora_bias, base_bias = module_bias(self.lora_B[adapter_name]), self.base_bias
        if lora_bias is not None and base_bias is not None:
            base_bias.data += sign * lora_bias.data.to(base_bias.dtype) * self.scaling[adapter_name]

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        x = self.lora_dropout[adapter_name](x).to(a.weight.dtype)
        return b(a(x)) * self.scaling[adapter_name]

    def _dropout_p(self, adapter_name: str) -> float:
        drop = self.lora_dropout[adapter_name]
        return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        # The base GEMM and the low-rank term, fused (see _fused.low_rank_linear).
        a_layer, b_layer = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if not isinstance(a_layer, nn.Linear) or module_bias(b_layer) is not None:
            return None
        a_w, b_w = self.factor_weights(adapter_name)
        p = self._dropout_p(adapter_name)
        needs_grad = torch.is_grad_enabled() and (a_w.requires_grad or b_w.requires_grad)
        plain = is_plain(self.base_layer, (nn.Linear,))
        if plain and p == 0 and low_rank_merge_pays(x, self.base_weight, a_w.shape[0], needs_grad):
            # Inference over many tokens: one GEMM with W + s B A (what merging computes), built by one addmm.
            weight = self.base_weight
            merged = torch.addmm(
                weight, b_w.to(weight.dtype), a_w.to(weight.dtype), alpha=self.scaling[adapter_name]
            )
            return self.base_forward_with_weight(x, merged, self.base_bias)
        return low_rank_linear(self.base_layer, x, a_w, b_w, self.scaling[adapter_name], p)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if not isinstance(a, nn.Linear) or module_bias(b) is not None:
            return super().add_adapter_output(result, x, adapter_name)
        # One GEMM-accumulate (result + s · hidden Bᵀ); dropout, when on, runs inside without an N×in copy.
        a_w, b_w = self.factor_weights(adapter_name)
        return low_rank_add(result, x, a_w, b_w, self.scaling[adapter_name], self._dropout_p(adapter_name))


class LoraModel(AdapterModel):
    """The tuner of LoRA and its variants: adds the ``bias`` option's trainable and saved biases."""

    def extra_trainable_parameters(self, adapter_name: str) -> Iterable[nn.Parameter]:
        """``bias="all"``: every bias outside the ``modules_to_save`` copies; ``"lora_only"``: the biases of
        the layers holding this adapter."""
        bias = getattr(self.peft_config[adapter_name], "bias", "none")
        if bias == "all":
            for name, p in self.model.named_parameters():
                if (
                    name.endswith(".bias")
                    and ".original_module." not in name
                    and ".modules_to_save." not in name
                ):
                    yield p
        elif bias == "lora_only":
            for _, layer in self.adapter_layers():
                layer_bias = layer.base_bias
                if adapter_name in layer.r and isinstance(layer_bias, nn.Parameter):
                    yield layer_bias

    def extra_saved_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The trained biases under PEFT's keys (see :func:`all_bias_tensors` for ``bias="all"``)."""
        bias = getattr(self.peft_config[adapter_name], "bias", "none")
        if bias == "all":
            return all_bias_tensors(self, adapter_name)
        out: dict[str, torch.Tensor] = {}
        if bias == "lora_only":
            for name, layer in self.adapter_layers():
                layer_bias = layer.base_bias
                if adapter_name in layer.r and layer_bias is not None:
                    out[f"{name}.base_layer.bias"] = layer_bias.detach()
        return out


def all_bias_tensors(tuner: AdapterModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """``bias="all"``: every state-dict key containing ``bias``, as PEFT selects them.

    PEFT's sweep also picks up the biases inside ``modules_to_save`` wrappers and writes them as
    ``<module>.original_module.bias`` and ``<module>.modules_to_save.bias`` (besides ``<module>.bias``);
    they are written here too so that both libraries produce the same key set.
    """
    skip = tuple(
        f"{name}.{attr}."
        for name, layer in tuner.adapter_layers()
        for attr in (*layer.adapter_param_names, *layer.other_param_names)
    )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tuner.model.state_dict().items():
        if "bias" not in key or key.startswith(skip):
            continue
        if ".modules_to_save." in key:
            marker = f".modules_to_save.{adapter_name}."
            if marker not in key:
                continue  # another adapter's copy
            key = key.replace(marker, ".modules_to_save.")
        out.setdefault(key, tensor)
    return out


register_method(
    MethodSpec(
        name="lora",
        config_cls=LoraConfig,
        layer_cls=LoraLayer,
        prefix="lora_",
        tuner_cls=LoraModel,
        selects=lambda config: not config.selects_variant,
        display_name="LoRA",
        example_kwargs={"r": 4, "lora_alpha": 8},
        listing_order=10,
        nonzero_init={"init_lora_weights": False},
    )
)
