"""DoRA's training step with input dropout on a plain Linear, as one autograd node.

PEFT's formula with dropout (see :mod:`.dora`), the norm n detached, scale = m / n, d = factor · dropped:

    y = x Wᵀ + b + (scale − 1) ⊙ (d Wᵀ) + scale ⊙ s · (d Aᵀ) Bᵀ

Two full GEMMs of the layer are inherent in it (x Wᵀ and d Wᵀ; in backward g W and one more), as in PEFT. What
autograd would add around them is folded here, in fp32 or the autocast dtype the caller casts to:

- forward: the base output is accumulated in place, ``y = base.addcmul_(d Wᵀ, c).addmm_(d Aᵀ, (scale ⊙ B)ᵀ)``,
  the row scale folded into B (out × r) instead of an N × out product; no N × out temporary besides d Wᵀ;
- backward: the input gradient through the adapter is one GEMM with M = (scale − 1) ⊙ W + s · (scale ⊙ B) A
  (built at out·in·r, not N·out·in); ``scale``'s gradient reuses gᵀ(d Aᵀ), which B's gradient needs too:
  colsum(g ⊙ d Wᵀ) + s · rowsum((gᵀ d Aᵀ) ⊙ B), so nothing of size N × out is saved but d Wᵀ (PEFT saves two);
- with the CPU keep-mask (:func:`~._fused.cpu_keep_mask`) the node applies the dropout itself, and x's whole
  gradient is ``((g M) ⊙ mask) + g W`` with the sum accumulated by the second GEMM (``addmm_``): no separate
  backward for the dropout and no addition of two N × in gradients by autograd; colsum(g ⊙ d Wᵀ) multiplies
  the kept d Wᵀ in place. On a VM each fresh N × in buffer costs milliseconds of page faults on one thread,
  more than the arithmetic, so the node allocates no temporary of that size in either direction.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._fused import _dropout, cpu_keep_mask

__all__ = ["dora_dropout_linear"]


class _DoraDropoutLinear(torch.autograd.Function):
    """Inputs x (N, in), dropped (N, in) or None with keep (N, in, uint8: dropped = x ⊙ keep, computed here),
    weight (out, in, frozen), bias, a (r, in), b (out, r), magnitude (out,), norm (out,, detached); floats s
    (the LoRA scaling) and factor (d = factor · dropped). Python numbers enter
    only as ``alpha``/``beta``/``value`` arguments: arithmetic with one would wrap it in a tensor first (4 more
    ops each)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        dropped: torch.Tensor | None,
        keep: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        magnitude: torch.Tensor,
        norm: torch.Tensor,
        s: float,
        factor: float,
    ) -> torch.Tensor:
        dtype = x.dtype
        if dropped is None:
            assert keep is not None, "the dropped input or the keep-mask"
            dropped = x * keep
        scale = magnitude / norm  # m / n, and (m − n) / n = scale − 1, in the magnitude's dtype
        shift = (magnitude - norm).div_(norm)
        scale_c, shift_c = (t if t.dtype == dtype else t.to(dtype) for t in (scale, shift))
        z = F.linear(dropped, weight)  # d Wᵀ / factor, kept for the magnitude's gradient
        h = F.linear(dropped, a)  # d Aᵀ / factor
        scaled_b = b * scale_c.unsqueeze(1)
        y = F.linear(x, weight, bias).addcmul_(z, shift_c, value=factor)
        y.addmm_(h, scaled_b.t(), alpha=s * factor)
        ctx.save_for_backward(dropped, keep, weight, a, b, norm, scale_c, shift_c, scaled_b, h)
        # d Wᵀ is consumed in place by the first backward (the magnitude's gradient), so it is kept on ctx
        # rather than saved: a second backward through the graph (retain_graph) computes it again
        ctx.z, ctx.s, ctx.factor = z, s, factor
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        dropped, keep, weight, a, b, norm, scale, shift, scaled_b, h = ctx.saved_tensors
        sf, factor = ctx.s * ctx.factor, ctx.factor
        needs = ctx.needs_input_grad
        grad_x = grad_dropped = grad_a = grad_b = grad_m = grad_bias = None
        if needs[1] or (needs[0] and keep is not None):
            # through M = factor·(scale − 1) ⊙ W + s·factor·(scale ⊙ B) A, one GEMM
            merged = torch.addmm(weight * shift.unsqueeze(1), scaled_b, a, beta=factor, alpha=sf)
            grad_dropped = grad.mm(merged)
            if keep is not None:  # x's whole gradient: the mask applied in place, g W accumulated onto it
                grad_x, grad_dropped = grad_dropped.mul_(keep).addmm_(grad, weight), None
        if needs[0] and grad_x is None:
            grad_x = grad.mm(weight)
        if needs[5]:
            grad_a = torch.addmm(a, grad.mm(scaled_b).t(), dropped, beta=0, alpha=sf)
        if needs[6] or needs[7]:
            gh = torch.addmm(b, grad.t(), h, beta=0, alpha=sf)  # s·factor · gᵀ(d Aᵀ), (out, r)
            if needs[6]:
                grad_b = gh * scale.unsqueeze(1)
            if needs[7]:
                z, ctx.z = ctx.z, None
                z = F.linear(dropped, weight) if z is None else z
                grad_scale = (gh * b).sum(1).add_(z.mul_(grad).sum(0), alpha=factor)
                grad_m = grad_scale.to(norm.dtype).div_(norm)
        if needs[4]:
            grad_bias = grad.sum(0)
        return grad_x, grad_dropped, None, None, grad_bias, grad_a, grad_b, grad_m, None, None, None


def dora_dropout_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    s: float,
    p: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """PEFT's DoRA output with input dropout p > 0 for a plain Linear, the GEMMs in ``dtype`` (the autocast
    dtype, or the common one; the magnitude and the norm stay in theirs); the weight must not need a gradient
    (the bias may).

    Shapes: x (..., in), weight (out, in), bias (out,) or None, a (r, in), b (out, r), magnitude and norm
    (out,) → (..., out).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.dtype == dtype else x2.to(dtype)
    keep = cpu_keep_mask(x2, p)
    dropped, factor = (None, 1.0 / (1.0 - p)) if keep is not None else _dropout(x2, p)
    cast = [t if t is None or t.dtype == dtype else t.to(dtype) for t in (weight, bias, a, b)]
    norm = norm if norm.dtype == magnitude.dtype else norm.to(magnitude.dtype)
    y = _DoraDropoutLinear.apply(x2, dropped, keep, *cast, magnitude, norm, s, factor)
    return y.view(*lead, y.shape[-1])
