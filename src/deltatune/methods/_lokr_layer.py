"""LoKr's maths and layer (the Kronecker fast path); formula and paper: :mod:`.lokr`."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..layers import expect_config
from ._fused import adapter_input
from ._lycoris import LycorisLayer, cp_core_shape, cp_rebuild
from .lokr import LoKrConfig

__all__ = ["LoKrLayer", "factorization", "lokr_delta_forward", "lokr_delta_weight"]


# ---- pure maths ---------------------------------------------------------------------------------
def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Splits ``dimension`` into (m, n), m·n = dimension, m ≤ n, as square as allowed by ``factor``.

    Examples: 768 → (24, 32); 4096 → (64, 64); 127 → (1, 127); (768, factor 8) → (8, 96).
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
        length = m + n
    return (n, m) if m > n else (m, n)


def lokr_delta_weight(
    w1: torch.Tensor, w2: torch.Tensor, scaling: float, shape: tuple[int, ...]
) -> torch.Tensor:
    """ΔW = s · kron(w1, w2), reshaped to ``shape``; a 4-D w2 makes w1 (a, c, 1, 1). A Conv1d's full 3-D w2
    (b, d, k) is kept as PEFT has it: ``torch.kron`` then treats w1 as (1, a, c), and the result is reshaped."""
    if w2.dim() == 4 and w1.dim() == 2:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    # torch.kron views its inputs; a CP-rebuilt w2 (an einsum result) is not contiguous.
    return (torch.kron(w1, w2.contiguous()) * scaling).reshape(shape)


def lokr_delta_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    scaling: float,
    w2: torch.Tensor | None = None,
    w2a: torch.Tensor | None = None,
    w2b: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """x ΔWᵀ for a Linear via the Kronecker reshape: x (..., c·d) → (..., a·b). Give ``w2`` (b, d) or its
    factors ``w2a`` (b, r) and ``w2b`` (r, d)."""
    a, c = w1.shape
    lead = x.shape[:-1]
    xm = x.reshape(-1, c, x.shape[-1] // c)  # (N, c, d), a view of a contiguous x
    if w2 is not None:
        t = xm @ w2.t()  # one (N·c, d) @ (d, b) GEMM
    elif w2a is not None and w2b is not None:
        t = (xm @ w2b.t()) @ w2a.t()
    else:
        raise ValueError("lokr_delta_forward needs w2, or both w2a and w2b")
    # (a, c) @ (N, c, b) → (N, a, b) as a batched GEMM on a stride-0 view of w1: no transposed copies
    # (torch.matmul would fold the batch by transposing t and the result).
    y = torch.bmm((w1 * scaling).expand(t.shape[0], a, c), t)
    y = y.reshape(*lead, -1)
    return y if row_mask is None else y * row_mask


# ---- layer --------------------------------------------------------------------------------------
class LoKrLayer(LycorisLayer):
    """Wraps a Linear, Conv1d or Conv2d with LoKr adapters."""

    repr_prefix: ClassVar[str] = "lokr"

    adapter_param_names: ClassVar[tuple[str, ...]] = (
        "lokr_w1",
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2",
        "lokr_w2_a",
        "lokr_w2_b",
        "lokr_t2",
    )
    always_rescale_rank_dropout: ClassVar[bool] = False
    lokr_w1: nn.ParameterDict
    lokr_w1_a: nn.ParameterDict
    lokr_w1_b: nn.ParameterDict
    lokr_w2: nn.ParameterDict
    lokr_w2_a: nn.ParameterDict
    lokr_w2_b: nn.ParameterDict
    lokr_t2: nn.ParameterDict

    def update_layer(self, adapter_name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        config = expect_config(config, LoKrConfig)
        shape = tuple(self.base_weight.shape)
        a, b = factorization(shape[0], config.decompose_factor)
        c, d = factorization(shape[1], config.decompose_factor)
        kernel = shape[2:]
        if config.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a[adapter_name] = self._new_param(a, r)
            self.lokr_w1_b[adapter_name] = self._new_param(r, c)
        else:
            self.lokr_w1[adapter_name] = self._new_param(a, c)
        if r >= max(b, d) / 2:
            self.lokr_w2[adapter_name] = self._new_param(b, d, *kernel)
        elif not kernel:
            self.lokr_w2_a[adapter_name] = self._new_param(b, r)
            self.lokr_w2_b[adapter_name] = self._new_param(r, d)
        elif config.use_effective_conv2d and any(k != 1 for k in kernel):
            self.lokr_t2[adapter_name] = self._new_param(r, r, *cp_core_shape(kernel))
            self.lokr_w2_a[adapter_name] = self._new_param(r, b)
            self.lokr_w2_b[adapter_name] = self._new_param(r, d)
        else:
            self.lokr_w2_a[adapter_name] = self._new_param(b, r)
            self.lokr_w2_b[adapter_name] = self._new_param(r, d * math.prod(kernel))
        self.r[adapter_name] = r
        self.scaling[adapter_name] = alpha / r
        self._set_dropouts(adapter_name, config, scale=config.rank_dropout_scale)
        self.reset_parameters(adapter_name, config.init_weights)
        self._finish_update(adapter_name)

    def reset_parameters(self, adapter_name: str, init: bool | str) -> None:
        """``True``: W1 (or W1a) = 0; ``"lycoris"``: W2 (or W2b) = 0; ``False``: all random."""
        self.kaiming_init(adapter_name)
        with torch.no_grad():
            if init is True:
                zero = self.lokr_w1 if adapter_name in self.lokr_w1 else self.lokr_w1_a
                nn.init.zeros_(zero[adapter_name])
            elif init == "lycoris":
                zero = self.lokr_w2 if adapter_name in self.lokr_w2 else self.lokr_w2_b
                nn.init.zeros_(zero[adapter_name])

    def _w1(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w1:
            return self.lokr_w1[adapter_name]
        return self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]

    def _w2(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w2:
            return self.lokr_w2[adapter_name]
        if adapter_name in self.lokr_t2:
            return cp_rebuild(
                self.lokr_t2[adapter_name], self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name]
            )
        return self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return lokr_delta_weight(
            self._w1(adapter_name),
            self._w2(adapter_name),
            self.scaling[adapter_name],
            tuple(self.base_weight.shape),
        )

    #: The Kronecker-reshape term runs as a skinny GEMM and a batch of tiny ones: bandwidth-bound, it costs
    #: about this many times its MAC count against a dense GEMM (measured on CPU at ViT q/v shapes,
    #: including the extra passes that add it to the output and to the input gradient).
    RESHAPE_BANDWIDTH_FACTOR: ClassVar[float] = 4.0

    def factored_macs_per_token(self, adapter_name: str) -> float | None:
        """c·d·b + a·c·b (c·r·(d+b) + a·c·b with a factored W2) for a Linear, weighted by
        :attr:`RESHAPE_BANDWIDTH_FACTOR`; None for a conv (which materialises ΔW)."""
        if not isinstance(self.base_layer, nn.Linear) or adapter_name in self.lokr_t2:
            return None
        out_dim, in_dim = self.base_weight.shape
        if adapter_name in self.lokr_w1:
            a, c = self.lokr_w1[adapter_name].shape
        else:
            a, c = self.lokr_w1_a[adapter_name].shape[0], self.lokr_w1_b[adapter_name].shape[1]
        b, d = out_dim // a, in_dim // c
        if adapter_name in self.lokr_w2:
            first = c * d * b
        else:
            first = c * self.lokr_w2_a[adapter_name].shape[1] * (d + b)
        return self.RESHAPE_BANDWIDTH_FACTOR * float(first + a * c * b)

    def delta_build_macs(self, adapter_name: str) -> float:
        """The Kronecker product (out·in) and, when W2 is factored, its rank-r product."""
        return 2.0 * self.base_weight.numel()

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if not isinstance(self.base_layer, nn.Linear):
            return self.materialized_output(x, adapter_name)
        w1 = self._w1(adapter_name)
        mask = self.rank_dropout_mask(adapter_name, w1.device, w1.dtype)
        x = adapter_input(x, w1.dtype, self.cast_input_dtype_enabled)
        if adapter_name in self.lokr_w2:
            return lokr_delta_forward(
                x, w1, self.scaling[adapter_name], w2=self.lokr_w2[adapter_name], row_mask=mask
            )
        return lokr_delta_forward(
            x,
            w1,
            self.scaling[adapter_name],
            w2a=self.lokr_w2_a[adapter_name],
            w2b=self.lokr_w2_b[adapter_name],
            row_mask=mask,
        )
