"""LoRA on ``nn.Embedding`` and ``nn.MultiheadAttention``: the layer kinds whose tensors or forward differ
from the Linear/conv layer of :mod:`.lora` (this module registers them with :class:`~.lora.LoraLayer`).

Embedding (PEFT's layout): ``lora_embedding_A`` (r, num_embeddings) and ``lora_embedding_B``
(embedding_dim, r) are plain parameters (saved keys without ``.weight``); A = 0 and B ~ N(0, 1) at init, so
the adapter starts as a no-op; no dropout.

    y = E[x] + s · (Aᵀ[x]) Bᵀ,   ΔE = s · (B A)ᵀ  (num_embeddings × embedding_dim)

MultiheadAttention (``kdim == vdim == embed_dim``): ``lora_A`` Linear(E, r) and ``lora_B`` Linear(r, 3E) adapt
the packed ``in_proj_weight`` (3E × E), and ``out_proj`` is wrapped in a LoRA Linear layer of its own, so the
keys are PEFT's (``mha.lora_A.weight``, ``mha.base_layer.out_proj.lora_A.weight``). ``nn.MultiheadAttention``
reads those weights directly instead of calling its submodules, so the forward runs the attention with the
adapted weights W + ΔW shadowing the stored ones for the duration of the call: gradients reach A and B, and
the module's parameters are never replaced or modified (PEFT merges and unmerges around every forward). As in PEFT, LoRA dropout does not apply inside attention and mixed-adapter
batches are refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..layer_types import apply_with_weight
from ..layers import expect_config, module_bias
from ._lora_base import EMBEDDING_VARIANTS, LoraLayerBase
from ._lora_layer import LoraLayer, lora_scaling
from ._lora_variants import VariantTable
from .lora import LoraConfig

__all__ = ["LoraEmbeddingLayer", "LoraMultiheadAttentionLayer", "lora_embedding_delta_weight"]


def lora_embedding_delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔE = s · (B A)ᵀ: A (r, num_embeddings), B (dim, r) → (num_embeddings, dim)."""
    return (lora_b @ lora_a).t() * scaling


@contextlib.contextmanager
def _shadowed(shadows: list[tuple[nn.Module, str, torch.Tensor]]) -> Iterator[None]:
    """Within the block, ``module.<name>`` reads the given tensor: it is put in the instance ``__dict__``,
    which attribute lookup consults before ``nn.Module``'s parameter table (and which also wins over the
    views FSDP installs there); the previous entries come back afterwards. Nothing is registered, so the
    module's parameters, state dict and ``requires_grad`` flags never change."""
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for module, name, tensor in shadows:
            saved.append((module, name, module.__dict__.get(name, _MISSING)))
            module.__dict__[name] = tensor
        yield
    finally:
        for module, name, previous in reversed(saved):
            if previous is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = previous


_MISSING = object()


def _plus_deltas(layer: LoraLayer, names: list[str]) -> torch.Tensor:
    """The layer's base weight plus the ΔW of each adapter in ``names`` (differentiable in the factors)."""
    weight = layer.base_weight
    for name in names:
        weight = weight + layer.delta_weight(name).to(weight.dtype)
    return weight


class LoraEmbeddingLayer(LoraLayerBase):
    """Wraps an ``nn.Embedding`` with LoRA adapters (see the module docstring)."""

    repr_prefix: ClassVar[str] = "lora"

    adapter_param_names: ClassVar[tuple[str, ...]] = ("lora_embedding_A", "lora_embedding_B")
    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.Embedding,)
    lora_embedding_A: nn.ParameterDict
    lora_embedding_B: nn.ParameterDict

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        """Creates A (r, num_embeddings) and B (dim, r) with PEFT's init.

        Raises:
            ValueError: for ``lora_bias=True`` (an embedding has no bias to add it to; PEFT refuses too).
        """
        config = expect_config(config, LoraConfig)
        if config.lora_bias:
            raise ValueError(f"lora_bias={config.lora_bias} is not supported for Embedding.")
        if config.init_lora_weights == "loftq":  # peft 0.21 fails here with a TypeError
            raise ValueError(
                "init_lora_weights='loftq' supports Linear and Conv1D layers, not Embedding; leave this layer out "
                "of target_modules or use another initialisation"
            )
        kw = self._new_dtype_device()
        num, dim = self.in_features, self.out_features
        # Drawn in PEFT's order (A, then B, then B again), so a given seed gives PEFT's tensors.
        a = torch.randn(r, num)
        b = torch.randn(dim, r)
        if config.init_lora_weights == "mica":  # B from Eᵀ's minor left singular vectors, A = 0
            from ._lora_init import mica_factors

            a, b = mica_factors(self.base_weight.t(), r)
        elif config.init_lora_weights is not False:
            nn.init.zeros_(a)
            nn.init.normal_(b)
        self.lora_embedding_A[adapter_name] = nn.Parameter(a.to(**kw))
        self.lora_embedding_B[adapter_name] = nn.Parameter(b.to(**kw))
        self.r[adapter_name] = r
        self.scaling[adapter_name] = lora_scaling(alpha, r, config.use_rslora)
        if config.init_lora_weights == "mica":
            self.freeze_weight(adapter_name, "lora_embedding_B")
        self._finish_update(adapter_name)

    def scale_for(self, r: int, alpha: float, config: Any) -> float:
        """s for rank ``r`` and ``alpha`` under ``config`` (rsLoRA or not); used by hot-swapping."""
        return lora_scaling(alpha, r, bool(config.use_rslora))

    @property
    def lora_variants(self) -> VariantTable:
        """DoRA and MiCA (BD-LoRA, KaSA and aLoRA are for Linear layers)."""
        return EMBEDDING_VARIANTS

    def factor_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): (r, num_embeddings) and (dim, r); B A is ΔEᵀ/s."""
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factor_weights(adapter_name)
        half_on_cpu = a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)
        compute = torch.float32 if half_on_cpu else a.dtype
        return lora_embedding_delta_weight(a.to(compute), b.to(compute), self.scaling[adapter_name])

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """s · (Aᵀ[x]) Bᵀ: looks the ids up in Aᵀ (the base's padding and max-norm options), then one GEMM."""
        a, b = self.factor_weights(adapter_name)
        hidden = apply_with_weight(self.base_layer, x, a.t())
        return (hidden @ b.t()) * self.scaling[adapter_name]


class LoraMultiheadAttentionLayer(LoraLayer):
    """Wraps an ``nn.MultiheadAttention`` (packed q/k/v weights) with LoRA on ``in_proj_weight`` and, through a
    nested LoRA Linear layer, on ``out_proj`` (see the module docstring)."""

    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.MultiheadAttention,)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if not getattr(base_layer, "_qkv_same_embed_dim", True):
            raise ValueError(
                "Only same embed for query/key/value is supported as of now for MultiheadAttention "
                "(kdim and vdim must equal embed_dim for LoRA to adapt its packed in_proj_weight)."
            )
        if not isinstance(getattr(base_layer, "out_proj", None), nn.Linear):
            raise TypeError("out_proj must be an instance of nn.Linear for MultiheadAttention.")

    @property
    def base_bias(self) -> torch.Tensor | None:
        """The packed ``in_proj_bias`` (3E,), if any."""
        bias = getattr(self.base_layer, "in_proj_bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    @property
    def out_proj_layer(self) -> LoraLayer:
        """The LoRA layer around ``out_proj``."""
        layer = self.base_layer.out_proj
        assert isinstance(layer, LoraLayer)
        return layer

    def update_layer(self, adapter_name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        config = expect_config(config, LoraConfig)
        kw = self._new_dtype_device()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=config.lora_bias, **kw)
        self.lora_dropout[adapter_name] = nn.Identity()  # weights are merged into attention: no input dropout
        self.r[adapter_name] = r
        self.scaling[adapter_name] = lora_scaling(alpha, r, config.use_rslora)
        self.reset_parameters(adapter_name, config.init_lora_weights)
        self._finish_update(adapter_name)
        base: Any = self.base_layer
        if not isinstance(base.out_proj, LoraLayer):
            base.out_proj = LoraLayer(base.out_proj)
        base.out_proj.update_layer(adapter_name, config, r, alpha)

    def _adapted(self, layer: LoraLayer) -> list[str]:
        """The adapters ``layer`` adds in forward: active, held, not merged, layer enabled."""
        if layer.disable_adapters:
            return []
        return [n for n in layer.active_adapters if n in layer.r and n not in layer.merged_adapters]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The attention on ``x`` (the query; key, value and options follow as for the base module)."""
        query = x
        if self.batch_adapter_names is not None:
            self.check_mixed_batch(query, self.batch_adapter_names)  # raises TypeError, as PEFT does
        out_layer = self.out_proj_layer
        if self.disable_adapters:
            for layer in (self, out_layer):
                if layer.merged:
                    layer.unmerge()
            return self.base_layer(query, *args, **kwargs)
        names, out_names = self._adapted(self), self._adapted(out_layer)
        if not names and not out_names:
            return self.base_layer(query, *args, **kwargs)
        shadows: list[tuple[nn.Module, str, torch.Tensor]] = []
        if names:
            shadows.append((self.base_layer, "in_proj_weight", _plus_deltas(self, names)))
            bias = self.base_bias
            for n in names:
                lora_bias = module_bias(self.lora_B[n])
                if bias is not None and lora_bias is not None:
                    bias = bias + lora_bias * self.scaling[n]
                    shadows.append((self.base_layer, "in_proj_bias", bias))
        if out_names:
            shadows.append((out_layer.base_layer, "weight", _plus_deltas(out_layer, out_names)))
        with _shadowed(shadows):
            return self.base_layer(query, *args, **kwargs)

    def check_mixed_batch(self, x: torch.Tensor, row_adapters: list[str]) -> None:
        raise TypeError(f"{self._get_name()} does not support mixed adapter batches.")

    # ---- the wrapped attention's attributes, as PEFT exposes them (code that reads mha.embed_dim etc.) ----
    @property
    def out_proj(self) -> nn.Module:
        """The wrapped attention's own ``out_proj`` Linear (inside its LoRA layer)."""
        base: Any = self.base_layer
        layer = base.out_proj
        return layer.base_layer if isinstance(layer, LoraLayer) else layer  # type: ignore[no-any-return]

    def merge_masks(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.MultiheadAttention.merge_masks`` of the wrapped attention."""
        base: Any = self.base_layer
        return base.merge_masks(*args, **kwargs)


def _base_attribute(name: str) -> property:
    return property(lambda self: getattr(self.base_layer, name), doc=f"The wrapped attention's ``{name}``.")


#: ``nn.MultiheadAttention`` attributes a LoRA-wrapped one answers from the wrapped module (PEFT's list).
MHA_ATTRIBUTES = (
    "embed_dim",
    "kdim",
    "vdim",
    "_qkv_same_embed_dim",
    "num_heads",
    "dropout",
    "batch_first",
    "head_dim",
    "in_proj_weight",
    "in_proj_bias",
    "bias_k",
    "bias_v",
    "add_zero_attn",
)
for _name in MHA_ATTRIBUTES:
    setattr(LoraMultiheadAttentionLayer, _name, _base_attribute(_name))
