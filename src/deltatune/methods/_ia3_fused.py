"""IA³ on a feed-forward ``nn.Linear`` in CPU eager mode: the vector folded into the weight, as one autograd node.

PEFT scales the input, ``y = (x ⊙ l) Wᵀ + b``: an N × in product forward, and backward two more (x's gradient
times l, and x ⊙ (g W) for l's) with a fresh N × in buffer each. The same output is ``x (W diag l)ᵀ + b``, and
scaling W's columns costs out · in, not N · in. Backward, x's gradient is ``g (W diag l)``, the GEMM the frozen
base pays anyway, and l's is ``colsum(x ⊙ g W) = colsum(x ⊙ grad_x) / l``: one N × in product instead of three.
On ViT-Small's fc2 (N = 1576 tokens, in = 1536, one thread) each of those products allocates 9.7 MB, whose page
faults on a VM cost more than the arithmetic.

Only where it is exact and cheaper: CPU eager mode, one dtype, no autocast, a frozen plain ``nn.Linear``, at least
as many rows of x as rows of W, and no entry of l zero or subnormal (l's gradient divides by it; l starts at 1).
What autograd saves is what PEFT's path saves (x and l); the output is not saved, so in-place changes to it after
the layer stay allowed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ia3_feedforward_linear"]


class _IA3FeedForwardLinear(torch.autograd.Function):
    """x (N, in), weight (out, in, frozen), bias (out,, frozen) or None, vector (1, in)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vector: torch.Tensor
    ) -> torch.Tensor:
        scaled = weight * vector  # W diag(l): out · in
        ctx.save_for_backward(x, scaled, vector)
        return F.linear(x, scaled, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, scaled, vector = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = grad.mm(scaled) if needs[0] or needs[3] else None  # (g W) diag(l)
        grad_vector = None
        if needs[3]:
            assert grad_x is not None
            grad_vector = torch.mul(grad_x, x).sum(0, keepdim=True).div_(vector)
        return grad_x if needs[0] else None, None, None, grad_vector


def ia3_feedforward_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vector: torch.Tensor
) -> torch.Tensor | None:
    """``(x ⊙ l) Wᵀ + b`` by the folded weight, or None where that path does not apply (see the module
    docstring); ``vector`` is the layer's (1, in) parameter. Shapes: x (..., in) → (..., out)."""
    dtype = x.dtype
    if (
        x.device.type != "cpu"
        or torch.compiler.is_compiling()
        or torch.is_autocast_enabled("cpu")
        or weight.requires_grad
        or (bias is not None and (bias.requires_grad or bias.dtype != dtype))
        or weight.dtype != dtype
        or vector.dtype != dtype
        or vector.shape != (1, weight.shape[1])
        or x.numel() // x.shape[-1] < weight.shape[0]
    ):
        return None
    with torch.no_grad():
        if bool((vector.abs() < torch.finfo(dtype).tiny).any()):
            return None
    lead = x.shape[:-1]
    y = _IA3FeedForwardLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, vector)
    return y.view(*lead, y.shape[-1])
