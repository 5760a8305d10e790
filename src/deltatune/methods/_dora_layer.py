"""DoRA's maths and layers (Linear, Conv, Embedding); formula, paper and cost: :mod:`.dora`."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..layer_types import CONV_TYPES, Conv1D, conv_groups, from_out_in, to_out_in
from ..layers import expect_config
from ._dora_cache import DoraCacheMixin
from ._dora_fused import dora_dropout_linear
from ._dora_magnitude import DoraMagnitude, DoraMagnitudes
from ._fused import fused_dtype, is_plain, low_rank_gemms, low_rank_merge_pays
from ._lora_kinds import LoraEmbeddingLayer
from ._lora_layer import LoraLayer
from .lora import LoraConfig

__all__ = [
    "DoraEmbeddingLayer",
    "DoraLayer",
    "dora_forward",
    "dora_grouped_row_norm",
    "dora_merged_weight",
    "dora_row_norm",
]


# ---- pure maths ---------------------------------------------------------------------------------
def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return _as(t, torch.float32)


def dora_row_norm(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    weight_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """‖W + s·B A‖ of every output row, without forming the out×in sum.

    Args:
        weight: W as (out, in) (a conv kernel flattened to (out, in·k…)).
        lora_a: A as (r, in) (flattened likewise).
        lora_b: B as (out, r).
        scaling: s.
        weight_sq: ‖W‖² by row, (out,), when the caller has it.

    Returns:
        (out,) norms, computed in the inputs' dtype (callers pass fp32).
    """
    if weight_sq is None:
        weight_sq = weight.square().sum(1)
    gram = lora_a @ lora_a.t()  # (r, r)
    # 2s·W Aᵀ + s²·B (A Aᵀ) in one GEMM, then its row-wise dot product with B
    cross = torch.addmm(weight @ lora_a.t(), lora_b, gram, beta=2.0 * scaling, alpha=scaling * scaling)
    return (cross * lora_b).sum(1).add_(weight_sq).clamp_min_(0).sqrt_()


def dora_grouped_row_norm(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, groups: int, scaling: float
) -> torch.Tensor:
    """Row norms of W + s·B A for a grouped conv, where the LoRA term is a full (ungrouped) kernel: W is placed
    on its block diagonal (output group j sees input group j only).

    Args:
        weight: W (out, in/groups, *kernel).
        lora_a: A (r, in, *kernel) (groups 1).
        lora_b: B (out, r/groups, 1…) (the base's groups).
        groups: The base's groups.
        scaling: s.

    Returns:
        (out,) norms.
    """
    out_dim, rank, in_dim = weight.shape[0], lora_a.shape[0], lora_a.shape[1]
    og, rg, ig = out_dim // groups, rank // groups, in_dim // groups
    a2 = lora_a.reshape(groups, rg, -1)  # (g, r/g, in·k)
    b2 = lora_b.reshape(groups, og, rg)  # (g, out/g, r/g)
    full = (torch.bmm(b2, a2) * scaling).reshape(out_dim, in_dim, -1)
    blocks = weight.reshape(groups, og, ig, -1)
    for j in range(groups):
        full[j * og : (j + 1) * og, j * ig : (j + 1) * ig] += blocks[j]
    return full.reshape(out_dim, -1).norm(dim=1)


def dora_merged_weight(
    weight: torch.Tensor,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', norm): W' = m ⊙ (W + ΔW) / ‖W₀ + ΔW‖ by output row, and the norm (kept to undo the merge). W₀ is
    ``norm_weight``, default W: the weight without the adapters merged into it before, as forward sees it.

    Shapes: weight, delta and norm_weight (out, …); magnitude with ``out`` elements (any PEFT shape).
    """
    combined = weight + delta
    normed = combined if norm_weight is None else norm_weight + delta
    norm = normed.reshape(normed.shape[0], -1).norm(dim=1)
    factor = (magnitude.reshape(-1) / norm).reshape(-1, *([1] * (weight.dim() - 1)))
    return factor * combined, norm


def dora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """y = (m / ‖W + s B A‖) ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b for a Linear (no dropout), the norm detached.

    Shapes: x (..., in), weight (out, in), lora_a (r, in), lora_b (out, r), magnitude (out,).
    """
    with torch.no_grad():
        norm = dora_row_norm(weight.float(), lora_a.float(), lora_b.float(), scaling)
    scale = magnitude / norm.to(magnitude.dtype)
    out = (F.linear(x, weight) + scaling * F.linear(F.linear(x, lora_a), lora_b)) * scale
    return out if bias is None else out + bias


# ---- layer --------------------------------------------------------------------------------------
class _DoraState(DoraCacheMixin):
    """What both DoRA layers add to LoRA's state: the learned magnitudes (``lora_magnitude_vector``, each also
    readable as PEFT's ``lora_magnitude_vector[name].weight``: :mod:`._dora_magnitude`) and, per merged adapter,
    the norms of W + ΔW at merge time (unmerging divides by them again); the norm cache is :mod:`._dora_cache`'s."""

    #: DoRA's forward paths need a float scale: no compiled hot-swapping (see :mod:`._lora_hotswap`).
    tensor_scaling: ClassVar[bool] = False
    lora_magnitude_vector: DoraMagnitudes
    _merge_norms: dict[str, torch.Tensor]
    _extra_per_adapter: dict[str, dict[str, Any]]
    _weight_sq: tuple[tuple[Any, ...], torch.Tensor] | None

    def _init_dora_state(self) -> None:
        """No magnitudes and no merge norms yet; the norms are per-adapter state (deleted with the adapter)."""
        self.lora_magnitude_vector = DoraMagnitudes()
        self._merge_norms = {}
        self._weight_sq = None
        self._extra_per_adapter.update({"merge_norms": self._merge_norms})

    @classmethod
    def extend_layer(cls, layer: Any) -> None:
        """Turns a LoRA layer into this DoRA layer in place, its LoRA adapters kept (a model where a DoRA adapter
        joins plain LoRA ones, as PEFT allows): the class only adds DoRA's per-adapter state."""
        layer.__class__ = cls
        layer._init_dora_state()

    def _weight_before_merges(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with the adapters merged so far taken out again: a DoRA adapter merged after others takes
        its norm from the weight its forward sees (as PEFT merges)."""
        layer: Any = self
        norms = dict(self._merge_norms)
        for name in reversed(layer.merged_adapters):
            weight = layer.unmerged_weight(name, weight)
        self._merge_norms.update(norms)
        return weight

    def is_dora(self, adapter_name: str) -> bool:
        """Whether ``adapter_name`` is a DoRA adapter here (a DoRA layer can also hold plain LoRA adapters)."""
        return adapter_name in self.lora_magnitude_vector

    def _pop_merge_norm(self, adapter_name: str) -> torch.Tensor:
        """The norms the merge of ``adapter_name`` divided by, forgotten (the adapter is being unmerged).

        Raises:
            RuntimeError: when the adapter is not merged in this layer.
        """
        norm = self._merge_norms.pop(adapter_name, None)
        if norm is None:
            raise RuntimeError(f"DoRA adapter {adapter_name!r} is not merged here; nothing to unmerge")
        return norm


class DoraLayer(_DoraState, LoraLayer):
    """LoRA's layer plus a magnitude per output channel (``lora_magnitude_vector``); see the module doc."""

    adapter_param_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_magnitude_vector")
    #: As PEFT: no ``nn.MultiheadAttention``; ``nn.Embedding`` is :class:`DoraEmbeddingLayer`.
    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, Conv1D, *CONV_TYPES, nn.Embedding)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._init_dora_state()

    def update_layer(self, adapter_name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        """LoRA's factors, then ``m`` = ‖W + ΔW‖ by output row (so the output starts as LoRA's).

        Raises:
            ValueError: for ``lora_bias=True`` (PEFT refuses it with DoRA too).
        """
        config = expect_config(config, LoraConfig)
        if not config.use_dora:  # a plain LoRA adapter beside DoRA ones
            super().update_layer(adapter_name, config, r, alpha)
            return
        if config.lora_bias:
            raise ValueError("lora_bias=True is not supported with DoRA (use_dora=True); PEFT refuses it too")
        super().update_layer(adapter_name, config, r, alpha)
        norm = self.row_norm(adapter_name)
        shape = (
            (norm.numel(),)
            if self.base_weight.dim() == 2
            else (1, norm.numel(), *[1] * (self.base_weight.dim() - 2))
        )
        magnitude = norm.reshape(shape).to(**self._new_dtype_device())
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude)

    def row_norm(self, adapter_name: str) -> torch.Tensor:
        """‖W + ΔW‖ of every output row as (out,), in fp32, detached (see :func:`dora_row_norm`); cached in
        eval mode under ``DoraCaching`` (:mod:`._dora_cache`)."""
        return self.cached_norm(adapter_name, self._row_norm)

    def _row_norm(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factor_weights(adapter_name)
        weight = to_out_in(self.base_layer, self.base_weight)  # (out, in…): a Conv1D's is transposed
        out_dim = weight.shape[0]
        groups = conv_groups(self.base_layer)
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            if groups > 1:
                w, fa, fb = (_fp32(t) for t in (weight, a, b))
                return dora_grouped_row_norm(w, fa, fb, groups, self.scaling[adapter_name])
            w2, a2, b2 = weight, a, b
            if weight.dim() != 2:  # a conv kernel: rows of (in · k…)
                w2, a2, b2 = weight.reshape(out_dim, -1), a.reshape(a.shape[0], -1), b.reshape(out_dim, -1)
            w2, a2, b2 = (_fp32(t) for t in (w2, a2, b2))
            return dora_row_norm(w2, a2, b2, self.scaling[adapter_name], self._cached_weight_sq(w2))

    def _cached_weight_sq(self, weight: torch.Tensor) -> torch.Tensor | None:
        """‖W‖² by row of the frozen base weight (``weight``: its fp32 (out, in…) rows), computed once and kept
        while the base weight's storage and version counter are unchanged (a merge or a load in place
        changes them); None (computed afresh) in inference mode, whose tensors have no version counter, and
        under ``torch.compile`` (the graph computes it; no host-side state in a traced graph)."""
        if torch.compiler.is_compiling():
            return None
        base = self.base_weight
        if torch.is_inference_mode_enabled() or base.requires_grad or base.is_inference():
            return None
        key = (base.data_ptr(), base._version, base.dtype, base.device, tuple(base.shape))
        if self._weight_sq is None or self._weight_sq[0] != key:
            self._weight_sq = (key, weight.square().sum(1))
        return self._weight_sq[1]

    def magnitude_scale(self, adapter_name: str, one_minus: bool = False) -> torch.Tensor:
        """m / ‖W + ΔW‖ in the magnitude's shape (gradients reach m, not the norm); with ``one_minus``,
        1 − m / ‖W + ΔW‖ as (‖W + ΔW‖ − m) / ‖W + ΔW‖, exactly 0 where m is the norm (at initialisation)."""
        magnitude = self.lora_magnitude_vector[adapter_name]
        norm = self.row_norm(adapter_name)
        if magnitude.dim() != 1:
            norm = norm.reshape(magnitude.shape)
        norm = norm if norm.dtype == magnitude.dtype else norm.to(magnitude.dtype)
        return (norm - magnitude) / norm if one_minus else magnitude / norm

    # ---- merging: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ -------------------------------------------------------
    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if not self.is_dora(adapter_name):
            return super().merged_weight(adapter_name, weight)
        base = self.base_layer
        delta = to_out_in(base, self.delta_weight(adapter_name).to(torch.float32))
        magnitude = self.lora_magnitude_vector[adapter_name].detach().float()
        before = to_out_in(base, self._weight_before_merges(weight).float())
        merged, norm = dora_merged_weight(to_out_in(base, weight.float()), delta, magnitude, before)
        self._merge_norms[adapter_name] = norm
        return from_out_in(base, merged).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if not self.is_dora(adapter_name):
            return super().unmerged_weight(adapter_name, weight)
        norm = self._pop_merge_norm(adapter_name)
        base = self.base_layer
        magnitude = self.lora_magnitude_vector[adapter_name].detach().float().reshape(-1)
        factor = (magnitude / norm).reshape(-1, *([1] * (weight.dim() - 1)))
        delta = to_out_in(base, self.delta_weight(adapter_name).to(torch.float32))
        return from_out_in(base, to_out_in(base, weight.float()) / factor - delta).to(weight.dtype)

    def check_mixed_batch(self, x: torch.Tensor, row_adapters: list[str]) -> None:
        """PEFT refuses mixed batches that use a DoRA adapter (``ValueError``)."""
        super().check_mixed_batch(x, row_adapters)
        if any(self.is_dora(name) for name in row_adapters):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")

    # ---- forward ------------------------------------------------------------------------------------
    def _bias_view(self, result: torch.Tensor) -> torch.Tensor | None:
        bias = self.base_bias
        if bias is None or not isinstance(self.base_layer, CONV_TYPES):  # a Linear/Conv1D bias broadcasts
            return bias
        return bias.view(1, -1, *([1] * (result.dim() - 2)))

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """PEFT's DoRA term added to ``result`` (the base output): (m/‖·‖ − 1)·base₀ + (m/‖·‖)·s·B A x, with
        base₀ = result − bias unless input dropout is active (then the base op on the dropped input)."""
        if not self.is_dora(adapter_name):
            return super().add_adapter_output(result, x, adapter_name)
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        dropout = self.lora_dropout[adapter_name]
        scale = self.magnitude_scale(adapter_name)
        if isinstance(dropout, nn.Dropout) and self.training:
            x = dropout(x)
            base = self.base_forward_with_weight(x, self.base_weight)
        else:
            bias = self._bias_view(result)
            base = result if bias is None else result - bias
        dtype = result.dtype
        lora = b(a(self._cast_input_dtype(x, self.factor_weights(adapter_name)[0].dtype)))
        scale = _as(scale, dtype)
        out = torch.addcmul(result, _as(base, dtype), scale - 1)
        return out.addcmul_(_as(lora, dtype), scale, value=self.scaling[adapter_name])

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """On a plain Linear: without dropout, the LoRA GEMM fused with the base one
        (:func:`~deltatune.methods._fused.low_rank_gemms`, one cast of the input), scaled by m/‖·‖ row by
        row — or, in inference over many tokens, one GEMM with the merged W'; with dropout, PEFT's formula as
        one autograd node (:func:`~deltatune.methods._dora_fused.dora_dropout_linear`). Else the generic path."""
        if not self.is_dora(adapter_name):
            return super().fused_forward(x, adapter_name)
        base = self.base_layer
        if (
            not isinstance(base, nn.Linear)
            or not is_plain(base, (nn.Linear,))
            or self._submodules_hooked(adapter_name)
        ):
            return None  # the generic path, which calls the modules (and runs their hooks)
        weight = self.base_weight
        a_w, b_w = self.factor_weights(adapter_name)
        dtype = fused_dtype(x, weight, a_w, b_w)
        if dtype is None:
            return None
        s = self.scaling[adapter_name]
        p = self._dropout_p(adapter_name)
        if p > 0:
            if weight.requires_grad:
                return None
            magnitude, norm = self.lora_magnitude_vector[adapter_name], self.row_norm(adapter_name)
            return dora_dropout_linear(x, weight, self.base_bias, a_w, b_w, magnitude, norm, s, p, dtype)
        needs_grad = torch.is_grad_enabled() and any(
            p.requires_grad for p in self.adapter_parameters(adapter_name)
        )
        if dtype == weight.dtype and low_rank_merge_pays(x, weight, a_w.shape[0], needs_grad):
            merged = torch.addmm(weight, b_w, a_w, alpha=s) * self.magnitude_scale(adapter_name).unsqueeze(1)
            return F.linear(x, merged, self.base_bias)
        bias = self.base_bias
        if bias is None:
            scale = _as(self.magnitude_scale(adapter_name), dtype)
            return low_rank_gemms(x, weight, None, a_w, b_w, s, 0.0, dtype) * scale
        # The bias goes into the GEMM as the base layer adds it (y), and (x Wᵀ + s·B A x)·scale + b is then
        # y + (1 − scale)·(b − y), one lerp: bit for bit the base output where m is the norm and B is 0 (at
        # initialisation), as PEFT's (scale − 1)·base term is.
        bias = _as(bias, dtype)
        out = low_rank_gemms(x, weight, bias, a_w, b_w, s, 0.0, dtype)
        return torch.lerp(out, bias, _as(self.magnitude_scale(adapter_name, one_minus=True), dtype))


class DoraEmbeddingLayer(_DoraState, LoraEmbeddingLayer):
    """DoRA on an ``nn.Embedding`` (PEFT's layout): a magnitude per embedding dimension (``lora_magnitude_vector``,
    (dim,)), the norm taken over the vocabulary, as PEFT treats an embedding's weight as (dim, num_embeddings):

        E' = (m / ‖E + ΔE‖_col) ⊙ (E + ΔE),   y = (m / ‖·‖) ⊙ (E[x] + s · Aᵀ[x] Bᵀ)
    """

    adapter_param_names: ClassVar[tuple[str, ...]] = (
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    )

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._init_dora_state()

    def update_layer(self, adapter_name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        super().update_layer(adapter_name, config, r, alpha)
        if not expect_config(config, LoraConfig).use_dora:  # a plain LoRA adapter beside DoRA ones
            return
        magnitude = self.column_norm(adapter_name).to(**self._new_dtype_device())
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude)

    def column_norm(self, adapter_name: str) -> torch.Tensor:
        """‖E + ΔE‖ over the vocabulary, one per embedding dimension (dim,), fp32, detached; cached in eval mode
        under ``DoraCaching`` (:mod:`._dora_cache`)."""
        return self.cached_norm(adapter_name, self._column_norm)

    def _column_norm(self, adapter_name: str) -> torch.Tensor:
        with torch.no_grad():
            return (self.base_weight.float() + self.delta_weight(adapter_name).float()).norm(dim=0)

    def magnitude_scale(self, adapter_name: str) -> torch.Tensor:
        """m / ‖E + ΔE‖ (gradients reach m, not the norm)."""
        magnitude = self.lora_magnitude_vector[adapter_name]
        return magnitude / self.column_norm(adapter_name).to(magnitude.dtype)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if not self.is_dora(adapter_name):
            return super().add_adapter_output(result, x, adapter_name)
        scale = self.magnitude_scale(adapter_name)
        term = self.adapter_output(x, adapter_name)
        return (scale * result + scale * term).to(result.dtype)

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if not self.is_dora(adapter_name):
            return super().merged_weight(adapter_name, weight)
        delta = self.delta_weight(adapter_name).float()
        magnitude = self.lora_magnitude_vector[adapter_name].detach().float()
        before = self._weight_before_merges(weight).float().t()
        merged, norm = dora_merged_weight(weight.float().t(), delta.t(), magnitude, before)
        self._merge_norms[adapter_name] = norm
        return merged.t().to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if not self.is_dora(adapter_name):
            return super().unmerged_weight(adapter_name, weight)
        norm = self._pop_merge_norm(adapter_name)
        factor = self.lora_magnitude_vector[adapter_name].detach().float() / norm
        return (weight.float() / factor - self.delta_weight(adapter_name).float()).to(weight.dtype)

    def check_mixed_batch(self, x: torch.Tensor, row_adapters: list[str]) -> None:
        super().check_mixed_batch(x, row_adapters)
        if any(self.is_dora(name) for name in row_adapters):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
