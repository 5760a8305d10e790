"""What LoHa and LoKr share: the dropout behaviour of the LyCORIS family, the CP
(Tucker) rebuild of a conv kernel, and the fast path that trains through the per-step weight W + ΔW.

- ``module_dropout`` p_m: in training, the whole adapter term is skipped with probability p_m.
- ``rank_dropout`` p_r: in training, a keep-mask over the output rows of ΔW (``rand(out) > p_r``),
  divided by its mean for LoHa (always) and for LoKr when ``rank_dropout_scale``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..layers import LowRankLayer
from ..tuner import AdapterModel
from ._fused import adapter_input, is_plain, merged_weight_pays
from ._lycoris_config import LycorisConfig


def cp_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """rebuild[p, q, k, l] = Σ_ij t[i, j, k, l] · wb[j, q] · wa[i, p]; t (r, r, k1, k2), wa (r, out),
    wb (r, in) → (out, in, k1, k2)."""
    return torch.einsum("ijkl,jq,ip->pqkl", t, wb, wa)


def cp_core_shape(kernel: tuple[int, ...]) -> tuple[int, int]:
    """The spatial shape of a CP core: the kernel of a Conv2d, (k, 1) for a Conv1d (PEFT's layout)."""
    return (kernel[0], kernel[1]) if len(kernel) == 2 else (kernel[0], 1)


class LycorisLayer(LowRankLayer):
    """Adds module and rank dropout on top of :class:`~deltatune.layers.LowRankLayer` for LoHa and LoKr."""

    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv1d, nn.Conv2d)
    #: Whether the rank-dropout mask is always divided by its mean (LoHa) or per config (LoKr).
    always_rescale_rank_dropout: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self._extra_per_adapter.update(
            rank_dropout=self.rank_dropout,
            module_dropout=self.module_dropout,
            rank_dropout_scale=self.rank_dropout_scale,
        )

    def _set_dropouts(self, adapter_name: str, config: LycorisConfig, scale: bool) -> None:
        self.rank_dropout[adapter_name] = float(config.rank_dropout)
        self.module_dropout[adapter_name] = float(config.module_dropout)
        self.rank_dropout_scale[adapter_name] = scale

    def rank_dropout_mask(
        self, adapter_name: str, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The output-row keep mask for this training step, or None when rank dropout is off."""
        p = self.rank_dropout[adapter_name]
        if not self.training or p <= 0:
            return None
        out = self.base_weight.shape[0]
        mask = (torch.rand(out, device=device) > p).to(dtype)
        if self.always_rescale_rank_dropout or self.rank_dropout_scale[adapter_name]:
            mask = mask / mask.mean().clamp_min(1e-12)
        return mask

    def module_keep(self, adapter_name: str, device: torch.device) -> bool | torch.Tensor:
        """Draws whether module dropout keeps the adapter on this training step (one draw per call).

        Eager: a Python bool, so a skipped adapter costs nothing. Under ``torch.compile``: a 0-d 0/1
        tensor to multiply the term by, so the draw needs no graph break.
        """
        p = self.module_dropout[adapter_name]
        if not self.training or p <= 0:
            return True
        if torch.compiler.is_compiling():
            return torch.rand((), device=device) > p
        return float(torch.rand(1)) > p

    def skipped_output(self, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The output of a step where the module drops out: ``result`` itself, as in PEFT (the adapter's
        tensors get no gradient, so the optimiser leaves them alone). Under ``torch.distributed`` with several
        processes, a zero-valued term keeps every adapter tensor in the autograd graph instead, so
        DistributedDataParallel (``find_unused_parameters=False``) never sees "unused parameters"."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return result
        if torch.distributed.get_world_size() <= 1:
            return result
        firsts = [t.reshape(-1)[0] for t in self.adapter_parameters(adapter_name)]
        zero = torch.stack(firsts).sum() * 0.0
        return result + zero.to(result.dtype)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        keep = self.module_keep(adapter_name, result.device)
        if keep is False:
            return self.skipped_output(result, adapter_name)
        if keep is True:
            return super().add_adapter_output(result, x, adapter_name)
        return result + (self.adapter_output(x, adapter_name) * keep).to(result.dtype)

    # ---- fast path: one GEMM with the per-step weight W + ΔW ----------------------------------------
    def factored_macs_per_token(self, adapter_name: str) -> float | None:
        """Cost per token of the method's factored (unmaterialised) term in bandwidth-weighted MACs, or
        None when it has none and would materialise ΔW."""
        return None

    def delta_build_macs(self, adapter_name: str) -> float:
        """MACs to build ΔW once."""
        return float(self.base_weight.numel())

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """``base_op(x, W + ΔW) + bias`` when that is cheaper than the base output plus a separate term
        (see :func:`~deltatune.methods._fused.merged_weight_pays`): the forward and the input gradient
        then cost exactly what the frozen layer costs. Module and rank dropout behave as in the generic
        path (rank dropout masks the rows of ΔW)."""
        base = self.base_layer
        if not is_plain(base, (nn.Linear, nn.Conv2d)):
            return None
        weight = self.base_weight
        tokens = x.numel() // max(1, x.shape[-1] if isinstance(base, nn.Linear) else x.shape[-3])
        params = self.adapter_parameters(adapter_name)
        training = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        factored = self.factored_macs_per_token(adapter_name)
        if not merged_weight_pays(x, weight, tokens, factored, self.delta_build_macs(adapter_name), training):
            return None
        keep = self.module_keep(adapter_name, weight.device)
        if keep is False:
            return self.skipped_output(base(x), adapter_name)
        delta = self.delta_weight(adapter_name)
        mask = self.rank_dropout_mask(adapter_name, delta.device, delta.dtype)
        if mask is not None:
            delta = delta * mask.view(-1, *([1] * (delta.dim() - 1)))
        if keep is not True:
            delta = delta * keep
        return self.base_forward_with_weight(x, weight + delta, self.base_bias)

    def materialized_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The adapter term through a full ΔW (with rank dropout on its output rows)."""
        delta = self.delta_weight(adapter_name)
        mask = self.rank_dropout_mask(adapter_name, delta.device, delta.dtype)
        if mask is not None:
            delta = delta * mask.view(-1, *([1] * (delta.dim() - 1)))
        return self.base_forward_with_weight(
            adapter_input(x, delta.dtype, self.cast_input_dtype_enabled), delta
        )


class LoHaModel(AdapterModel):
    """LoHa's tuner, under PEFT's name (``LoHaModel(model, config, adapter_name)``): the generic
    :class:`~deltatune.tuner.AdapterModel`, which every method without tuner-level extras uses."""


class LoKrModel(AdapterModel):
    """LoKr's tuner, under PEFT's name (``LoKrModel(model, config, adapter_name)``): the generic
    :class:`~deltatune.tuner.AdapterModel`, which every method without tuner-level extras uses."""
