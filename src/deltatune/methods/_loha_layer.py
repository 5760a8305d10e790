"""LoHa's maths and layer (Khatri-Rao fast path, CP form); formula and paper: :mod:`.loha`."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..layers import expect_config
from ._fused import adapter_input
from ._lycoris import LycorisLayer, cp_core_shape, cp_rebuild
from ._lycoris_config import LycorisConfig

__all__ = ["LoHaLayer", "loha_delta_forward", "loha_delta_weight", "loha_khatri_rao_factors"]


# ---- pure maths ---------------------------------------------------------------------------------
def loha_delta_weight(
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scaling: float,
    shape: tuple[int, ...],
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔW = s · (w1a w1b) ⊙ (w2a w2b), reshaped to ``shape`` (or the CP form when t1/t2 are given)."""
    if t1 is not None and t2 is not None:  # (out, in, k1, k2); a Conv1d's (out, in, k, 1) is reshaped to 3-D
        return (cp_rebuild(t1, w1a, w1b) * cp_rebuild(t2, w2a, w2b) * scaling).reshape(shape)
    return HadamardProduct.apply(w1a, w1b, w2a, w2b, scaling).reshape(shape)  # type: ignore[no-any-return]


class HadamardProduct(torch.autograd.Function):
    """s · (w1a w1b) ⊙ (w2a w2b) that saves only the four factors for backward, recomputing the two out×in
    products there (an autograd graph of plain ops would keep both: two extra out×in tensors per layer and
    step). Computed in the factors' dtype with autocast off, so a merged W + ΔW keeps ΔW's precision.

    Shapes: w1a, w2a (out, r); w1b, w2b (r, in) → (out, in).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float
    ) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        with torch.autocast(w1a.device.type, enabled=False):
            return torch.mm(w1a, w1b).mul_(torch.mm(w2a, w2b)).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        g = grad.to(w1a.dtype) * ctx.scale
        g1 = g * torch.mm(w2a, w2b)  # ∂/∂(w1a w1b)
        g2 = g.mul_(torch.mm(w1a, w1b))  # ∂/∂(w2a w2b)
        return g1 @ w1b.t(), w1a.t() @ g1, g2 @ w2b.t(), w2a.t() @ g2, None


def loha_khatri_rao_factors(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """U (out, r1·r2) and V (r1·r2, in) with U V = (w1a w1b) ⊙ (w2a w2b)."""
    u = (w1a.unsqueeze(2) * w2a.unsqueeze(1)).reshape(w1a.shape[0], -1)
    v = (w1b.unsqueeze(1) * w2b.unsqueeze(0)).reshape(-1, w1b.shape[1])
    return u, v


def loha_delta_forward(
    x: torch.Tensor,
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scaling: float,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """x ΔWᵀ for a Linear through the Khatri-Rao factors: x (..., in) → (..., out)."""
    u, v = loha_khatri_rao_factors(w1a, w1b, w2a, w2b)
    u = u * scaling if row_mask is None else u * (row_mask * scaling).unsqueeze(1)
    return F.linear(F.linear(x, v), u)


def khatri_rao_is_cheaper(r1: int, r2: int, fan_in: int, fan_out: int) -> bool:
    """True when r1·r2 < in·out/(in+out): the factored forward costs fewer MACs than a dense ΔW."""
    return r1 * r2 * (fan_in + fan_out) < fan_in * fan_out


# ---- layer --------------------------------------------------------------------------------------
class LoHaLayer(LycorisLayer):
    """Wraps a Linear, Conv1d or Conv2d with LoHa adapters."""

    repr_prefix: ClassVar[str] = "loha"

    adapter_param_names: ClassVar[tuple[str, ...]] = (
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
        "hada_t1",
        "hada_t2",
    )
    hada_w1_a: nn.ParameterDict
    hada_w1_b: nn.ParameterDict
    hada_w2_a: nn.ParameterDict
    hada_w2_b: nn.ParameterDict
    hada_t1: nn.ParameterDict
    hada_t2: nn.ParameterDict

    def update_layer(self, adapter_name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        config = expect_config(config, LycorisConfig)
        base = self.base_layer
        shape = tuple(self.base_weight.shape)
        out_dim, in_dim = shape[0], shape[1]
        if isinstance(base, nn.Conv1d | nn.Conv2d):
            kernel = shape[2:]
            if config.use_effective_conv2d and any(k != 1 for k in kernel):
                core = cp_core_shape(kernel)  # a Conv1d's kernel k becomes (k, 1), as in PEFT
                self.hada_t1[adapter_name] = self._new_param(r, r, *core)
                self.hada_t2[adapter_name] = self._new_param(r, r, *core)
                self.hada_w1_a[adapter_name] = self._new_param(r, out_dim)
                self.hada_w2_a[adapter_name] = self._new_param(r, out_dim)
                self.hada_w1_b[adapter_name] = self._new_param(r, in_dim)
                self.hada_w2_b[adapter_name] = self._new_param(r, in_dim)
            else:
                self._create_plain(adapter_name, r, out_dim, in_dim * math.prod(kernel))
        else:
            self._create_plain(adapter_name, r, out_dim, in_dim)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = alpha / r
        self._set_dropouts(adapter_name, config, scale=True)
        self.reset_parameters(adapter_name, config.init_weights)
        self._finish_update(adapter_name)

    def _create_plain(self, adapter_name: str, r: int, out_dim: int, in_dim: int) -> None:
        self.hada_w1_a[adapter_name] = self._new_param(out_dim, r)
        self.hada_w1_b[adapter_name] = self._new_param(r, in_dim)
        self.hada_w2_a[adapter_name] = self._new_param(out_dim, r)
        self.hada_w2_b[adapter_name] = self._new_param(r, in_dim)

    def reset_parameters(self, adapter_name: str, init: bool | str) -> None:
        """``True``: every factor kaiming-uniform except w2b = 0; ``False``: all kaiming-uniform."""
        self.kaiming_init(adapter_name)
        if init is True:
            with torch.no_grad():
                nn.init.zeros_(self.hada_w2_b[adapter_name])

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            self.hada_w1_a[adapter_name],
            self.hada_w1_b[adapter_name],
            self.hada_w2_a[adapter_name],
            self.hada_w2_b[adapter_name],
        )

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        w1a, w1b, w2a, w2b = self._factors(adapter_name)
        return loha_delta_weight(
            w1a,
            w1b,
            w2a,
            w2b,
            self.scaling[adapter_name],
            tuple(self.base_weight.shape),
            self.hada_t1.get(adapter_name),
            self.hada_t2.get(adapter_name),
        )

    def factored_macs_per_token(self, adapter_name: str) -> float | None:
        """r1·r2·(in+out) for the Khatri-Rao term of a Linear (two plain GEMMs); None when it would
        cost more than a dense ΔW, or for a conv (both materialise ΔW)."""
        if not isinstance(self.base_layer, nn.Linear):
            return None
        w1a, _, w2a, _ = self._factors(adapter_name)
        out_dim, in_dim = self.base_weight.shape
        if not khatri_rao_is_cheaper(w1a.shape[1], w2a.shape[1], in_dim, out_dim):
            return None
        return float(w1a.shape[1] * w2a.shape[1] * (in_dim + out_dim))

    def delta_build_macs(self, adapter_name: str) -> float:
        """Two rank-r products and their Hadamard product: (2r + 1)·out·in."""
        return float((2 * self.r[adapter_name] + 1) * self.base_weight.numel())

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if isinstance(self.base_layer, nn.Linear):
            w1a, w1b, w2a, w2b = self._factors(adapter_name)
            out_dim, in_dim = self.base_layer.weight.shape
            if khatri_rao_is_cheaper(w1a.shape[1], w2a.shape[1], in_dim, out_dim):
                mask = self.rank_dropout_mask(adapter_name, w1a.device, w1a.dtype)
                x = adapter_input(x, w1a.dtype, self.cast_input_dtype_enabled)
                return loha_delta_forward(x, w1a, w1b, w2a, w2b, self.scaling[adapter_name], mask)
        return self.materialized_output(x, adapter_name)
