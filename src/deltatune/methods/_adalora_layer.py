"""AdaLoRA's maths and layer: the SVD-like triplet ΔW = B (A ⊙ E) · alpha / (ranknum + 1e-5), the orthogonal
regulariser, and :class:`SVDLayer`, which wraps a Linear or Conv2d (see :mod:`deltatune.methods.adalora`).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..layer_types import Conv1D, is_transposed, to_out_in
from ..layers import LowRankLayer, expect_config
from ._fused import adapter_input, is_plain, low_rank_add, low_rank_linear, low_rank_merge_pays
from .lora import LoraConfig

__all__ = ["SVDLayer", "adalora_delta_weight", "adalora_scaling", "orthogonal_regularizer"]


# ---- pure maths ---------------------------------------------------------------------------------
def adalora_scaling(lora_alpha: float, r: int) -> float:
    """PEFT's numerator: lora_alpha if > 0 else r (divided by ranknum + 1e-5 at use)."""
    return lora_alpha if lora_alpha > 0 else r


def adalora_delta_weight(
    lora_a: torch.Tensor,
    lora_e: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    ranknum: torch.Tensor | float,
) -> torch.Tensor:
    """ΔW = B (A ⊙ E) · scaling / (ranknum + 1e-5); A (r, in), E (r, 1), B (out, r) → (out, in)."""
    return (lora_b @ (lora_a * lora_e)) * (scaling / (ranknum + 1e-5))


def orthogonal_regularizer(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over all A and B of ‖P − I‖_F with P = A Aᵀ for A (r, in) and P = Bᵀ B for B (out, r).

    Factors of the same shape are batched into one ``bmm`` (see :class:`GramDeviationNorms`).
    """
    groups: dict[tuple[str | int, ...], list[torch.Tensor]] = {}
    for a, b in factors:
        groups.setdefault(("A", *a.shape), []).append(a)
        groups.setdefault(("B", *b.shape), []).append(b.t())
    total: torch.Tensor | None = None
    count = 0
    for mats in groups.values():
        norms = GramDeviationNorms.apply(*mats)
        total = norms if total is None else total + norms
        count += len(mats)
    if total is None:
        raise ValueError("orthogonal_regularizer needs at least one (A, B) pair")
    return total / count


class GramDeviationNorms(torch.autograd.Function):
    """Σᵢ ‖Mᵢ Mᵢᵀ − I‖_F over matrices of one shape (r, n), batched, with its closed-form gradient
    ∂/∂Mᵢ = 2 Dᵢ Mᵢ / ‖Dᵢ‖_F (Dᵢ = Mᵢ Mᵢᵀ − I, symmetric). Only the r×r deviations and their norms are saved:
    the stacked (L, r, n) copy of the factors that a plain ``bmm`` graph would keep is rebuilt in backward."""

    @staticmethod
    def forward(ctx: Any, *mats: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        stack = torch.stack(mats)  # (L, r, n), freed after this call
        dev = torch.bmm(stack, stack.transpose(1, 2))
        dev.diagonal(dim1=1, dim2=2).sub_(1.0)
        norms = torch.linalg.matrix_norm(dev)
        ctx.save_for_backward(*mats, dev, norms)
        return norms.sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        *mats, dev, norms = ctx.saved_tensors
        coef = (2.0 * grad) / norms.clamp_min(torch.finfo(norms.dtype).tiny)  # D = 0 gives a zero gradient
        grads = torch.bmm(dev * coef.view(-1, 1, 1), torch.stack(mats))
        return tuple(grads.unbind(0))


# ---- layer --------------------------------------------------------------------------------------
class SVDLayer(LowRankLayer):
    """Wraps a Linear, transformers ``Conv1D`` (GPT-2; ``fan_in_fan_out``) or Conv2d with AdaLoRA triplets
    (``lora_A``, ``lora_E``, ``lora_B``)."""

    repr_prefix: ClassVar[str] = "adalora"

    adapter_param_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_E", "lora_B")
    other_param_names: ClassVar[tuple[str, ...]] = ("ranknum",)

    lora_A: nn.ParameterDict
    lora_E: nn.ParameterDict
    lora_B: nn.ParameterDict
    ranknum: nn.ParameterDict

    def _get_name(self) -> str:
        """PEFT's name in ``repr`` (and ``get_layer_status``): ``adalora.SVDLinear``, ``adalora.SVDConv2d``."""
        prefix, _, kind = super()._get_name().partition(".")
        return f"{prefix}.SVD{kind}"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        #: adapter → scaling / (ranknum + 1e-5), the factor the triplet term is multiplied by
        self.rank_scale: dict[str, float] = {}
        self._extra_per_adapter.update({"rank_scale": self.rank_scale})

    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, Conv1D, nn.Conv2d)

    def _fan_in(self) -> int:
        return int(to_out_in(self.base_layer, self.base_weight)[0].numel())

    def update_layer(self, adapter_name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        config = expect_config(config, LoraConfig)  # an AdaLoraConfig (a LoraConfig subclass)
        out_dim = self.out_features
        if isinstance(self.base_layer, Conv1D | nn.Linear) and config.fan_in_fan_out != is_transposed(
            self.base_layer
        ):
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not match the target "
                f"({type(self.base_layer).__name__}); setting it to {not config.fan_in_fan_out}",
                stacklevel=4,
            )
            config.fan_in_fan_out = is_transposed(self.base_layer)
        self.lora_A[adapter_name] = self._new_param(r, self._fan_in())
        self.lora_E[adapter_name] = self._new_param(r, 1)
        self.lora_B[adapter_name] = self._new_param(out_dim, r)
        self.ranknum[adapter_name] = self._new_param(1, requires_grad=False)
        with torch.no_grad():
            self.ranknum[adapter_name].fill_(float(r))
        self.lora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.r[adapter_name] = r
        self.scaling[adapter_name] = adalora_scaling(alpha, r)
        self.rank_scale[adapter_name] = self.scaling[adapter_name] / (float(r) + 1e-5)
        with torch.no_grad():
            if config.init_lora_weights is False:
                for p in (self.lora_A, self.lora_E, self.lora_B):
                    nn.init.normal_(p[adapter_name])
            else:
                nn.init.zeros_(self.lora_E[adapter_name])
                nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)
        self._finish_update(adapter_name)

    def resize(self, adapter_name: str, rank: int) -> None:
        """Rebuilds the triplets at ``rank`` (for loading a pruned adapter); ``ranknum`` keeps init_r."""
        for name in self.adapter_param_names:
            container = getattr(self, name)
            old = container[adapter_name]
            shape = list(old.shape)
            shape[1 if name == "lora_B" else 0] = rank
            container[adapter_name] = nn.Parameter(
                torch.zeros(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
            )
        self.r[adapter_name] = rank

    def _ranknum(self, adapter_name: str) -> torch.Tensor:
        return self.ranknum[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = adalora_delta_weight(
            self.lora_A[adapter_name],
            self.lora_E[adapter_name],
            self.lora_B[adapter_name],
            self.scaling[adapter_name],
            self._ranknum(adapter_name),
        )
        if is_transposed(self.base_layer):  # Conv1D stores (in, out)
            return delta.t()
        return delta.reshape(self.base_weight.shape)

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a = self.lora_A[adapter_name]
        x = adapter_input(self.lora_dropout[adapter_name](x), a.dtype, self.cast_input_dtype_enabled)
        if not isinstance(self.base_layer, nn.Linear | Conv1D):
            return self.base_forward_with_weight(x, self.delta_weight(adapter_name))
        hidden = F.linear(x, a * self.lora_E[adapter_name])
        return F.linear(hidden, self.lora_B[adapter_name]) * self.rank_scale[adapter_name]

    def _low_rank_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(A ⊙ E, B, the scale alpha / (ranknum + 1e-5), dropout p): E folds into A (one r×in product) and
        the scale into the GEMM's alpha, so the term is a plain low-rank GEMM pair. ``ranknum`` is fixed at
        ``init_r`` when the adapter is created (also when a pruned adapter is resized), so the scale is a
        Python number: no tensor op and no host read per step."""
        drop = self.lora_dropout[adapter_name]
        p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
        a = self.lora_A[adapter_name] * self.lora_E[adapter_name]
        return a, self.lora_B[adapter_name], self.rank_scale[adapter_name], p

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        # The base GEMM and the low-rank term, fused (see _fused.low_rank_linear).
        if not isinstance(self.base_layer, nn.Linear):
            return None
        a, b, scale, p = self._low_rank_factors(adapter_name)
        inference = p == 0 and not (torch.is_grad_enabled() and a.requires_grad)
        plain = inference and is_plain(self.base_layer, (nn.Linear,))
        if plain and low_rank_merge_pays(x, self.base_weight, a.shape[0], False):
            # Inference over many tokens: one GEMM with W + s B (A ⊙ E) (what merging computes).
            weight = self.base_weight
            merged = torch.addmm(weight, b.to(weight.dtype), a.to(weight.dtype), alpha=scale)
            return self.base_forward_with_weight(x, merged, self.base_bias)
        return low_rank_linear(self.base_layer, x, a, b, scale, p)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if not isinstance(self.base_layer, nn.Linear):
            return super().add_adapter_output(result, x, adapter_name)
        a, b, scale, p = self._low_rank_factors(adapter_name)
        return low_rank_add(result, x, a, b, scale, p)

    def export_tensors(self, adapter_name: str, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The saved tensors, sliced to the kept triplets when ``keep`` (a bool mask over r) is given."""
        a, e, b = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        # A module loaded from a pruned adapter is already resized to the kept triplets: nothing to slice.
        if keep is not None and keep.numel() == a.shape[0]:
            a, e, b = a[keep], e[keep], b[:, keep]
        elif keep is not None and int(keep.sum()) != a.shape[0]:
            raise ValueError(
                f"rank_pattern keeps {int(keep.sum())} of {keep.numel()} triplets but the module holds "
                f"{a.shape[0]}; the rank_pattern does not belong to this adapter"
            )
        return {"lora_A": a.detach(), "lora_E": e.detach(), "lora_B": b.detach()}
