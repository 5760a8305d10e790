"""Fast paths shared by the methods: low-rank terms fused with the base GEMM, and the choice between a
factored adapter term and a per-step merged weight W + ΔW.

Everything here computes the adapter maths of the method modules exactly (up to floating-point rounding
order); the methods decide when a path applies, and fall back to their plain formulas otherwise.

On a GPU an adapter's cost is mostly the operations it issues, so the fused paths issue as few as they can:

- :class:`LowRankLinear` (LoRA, AdaLoRA, DoRA on a plain ``nn.Linear``): the base GEMM and
  ``s · (dropout(x) Aᵀ) Bᵀ`` in one autograd node. The low-rank term accumulates in place into the base
  output (``addmm_``, scale folded into its ``alpha``) and, in backward, the adapter's input gradient into the
  base's, so no N×in or N×out temporaries are written or summed separately.
- **Autocast is handled inside**, once: under ``torch.autocast`` each input is cast to the autocast dtype a
  single time (the frozen weight, the small factors, and the layer input once for both GEMMs, where an
  unfused adapter casts it for the base GEMM and again for its own), the casts are saved for backward instead
  of being redone there, and the output has the dtype autocast would give.
- **Dropout is one op** (``torch.native_dropout``: a fused kernel on CUDA) and none at all when p = 0 or in
  eval. The dropped input is what the A-gradient needs, so it is saved instead of the layer input (same
  size), with a 1-byte mask for the input gradient (``native_dropout_backward``). No dtype views of bool
  masks: everything here compiles with ``torch.compile``.
- :class:`LowRankAdd`: the same term added to an existing base output (a base layer with hooks or a
  subclass with its own forward), as one node.
- :func:`merged_weight_pays`: whether ``base_op(x, W + ΔW)`` (one GEMM, plus one weight-gradient GEMM in
  training) beats the method's factored term for this call; used by LoHa and LoKr.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "LOW_RANK_BANDWIDTH_FACTOR",
    "LowRankAdd",
    "LowRankLinear",
    "autocast_dtype",
    "dropout_keep_mask",
    "fused_dtype",
    "is_plain",
    "low_rank_add",
    "low_rank_linear",
    "low_rank_merge_pays",
    "merged_weight_pays",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on ``device_type``, or None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def dropout_keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str
) -> torch.Tensor:
    """The bool keep-mask that :func:`torch.native_dropout` draws for a tensor of ``shape`` from the current
    RNG state (entries kept with probability 1 − p); for tests that rebuild a fused path's mask."""
    return torch.native_dropout(torch.zeros(shape, device=device), p, True)[1]


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _dropped(x2: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x with dropout applied and scaled by 1/(1−p), the bool keep-mask) — or (x, None) when p = 0."""
    if p <= 0:
        return x2, None
    out, keep = torch.native_dropout(x2, p, True)
    return out, keep


def _dropout_backward(grad: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """``grad ⊙ keep · scale`` in one op (the backward of ``native_dropout``)."""
    return torch.ops.aten.native_dropout_backward(grad, keep, scale)  # type: ignore[no-any-return]


def _addmm_scaled(m1: torch.Tensor, m2: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha · m1 @ m2`` as one GEMM (``addmm`` with ``beta=0`` reads no input: an empty one is passed)."""
    return torch.addmm(m1.new_empty((1,)), m1, m2, beta=0, alpha=alpha)


class LowRankLinear(torch.autograd.Function):
    """A whole adapted Linear in one node: ``y = x Wᵀ + bias + s · (drop(x) Aᵀ) Bᵀ``, computed in ``dtype``.

    Shapes: x (..., in), weight (out, in), bias (out,) or None, a (r, in), b (out, r). ``drop`` is input dropout
    with probability p (identity when p = 0). Inputs of another dtype are cast to ``dtype`` once (autocast's
    dtype, or x's own); the casts are what backward reuses. Saves: the (dropped) input in ``dtype``, the
    weight in ``dtype`` (only when the input needs a gradient), the (N, r) hidden product, the factors and,
    with dropout, a bool mask.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        p: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x2 = _cast(x.reshape(-1, x.shape[-1]), dtype)
            w, ac, bc = _cast(weight, dtype), _cast(a, dtype), _cast(b, dtype)
            cb = _cast(bias, dtype)
            assert x2 is not None and w is not None and ac is not None and bc is not None
            y = torch.mm(x2, w.t()) if cb is None else torch.addmm(cb, x2, w.t())
            xd, keep = _dropped(x2, p)
            hidden = torch.mm(xd, ac.t())
            y.addmm_(hidden, bc.t(), alpha=scale)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(
            xd if ctx.needs_input_grad[3] else None,
            x2 if need_w else None,
            w if need_x else None,
            keep,
            hidden,
            ac,
            bc,
        )
        ctx.scale, ctx.p, ctx.x_shape = scale, p, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xd, x2, w, keep, hidden, ac, bc = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1]).to(hidden.dtype)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_b:
            grad_b = _addmm_scaled(g.t(), hidden, s)
        if need_x or need_a:
            gh = _addmm_scaled(g, bc, s)  # (N, r): s · g B
            if need_a:
                grad_a = torch.mm(gh.t(), xd)
            if need_x:
                grad_x = torch.mm(g, w)
                if keep is None:
                    grad_x.addmm_(gh, ac)
                else:
                    grad_x.add_(_dropout_backward(torch.mm(gh, ac), keep, 1.0 / (1.0 - p)))
                grad_x = grad_x.view(ctx.x_shape)
        if need_w:
            grad_w = torch.mm(g.t(), x2)
        if need_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


class LowRankAdd(torch.autograd.Function):
    """``result + s · (drop(x) Aᵀ) Bᵀ`` in one node, computed in ``result``'s dtype (one cast per input).

    Shapes: result (..., out), x (..., in), a (r, in), b (out, r).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        result: torch.Tensor,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        p: float,
    ) -> torch.Tensor:
        dtype = result.dtype
        with torch.autocast(x.device.type, enabled=False):
            x2 = _cast(x.reshape(-1, x.shape[-1]), dtype)
            ac, bc = _cast(a, dtype), _cast(b, dtype)
            assert x2 is not None and ac is not None and bc is not None
            xd, keep = _dropped(x2, p)
            hidden = torch.mm(xd, ac.t())
            out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden, bc.t(), alpha=scale)
        ctx.save_for_backward(xd if ctx.needs_input_grad[2] else None, keep, hidden, ac, bc)
        ctx.scale, ctx.p, ctx.x_shape = scale, p, x.shape
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xd, keep, hidden, ac, bc = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        need_result, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        g = grad.reshape(-1, grad.shape[-1]).to(hidden.dtype)
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = _addmm_scaled(g.t(), hidden, s)
        if need_x or need_a:
            gh = _addmm_scaled(g, bc, s)
            if need_a:
                grad_a = torch.mm(gh.t(), xd)
            if need_x:
                grad_x = torch.mm(gh, ac)
                if keep is not None:
                    grad_x = _dropout_backward(grad_x, keep, 1.0 / (1.0 - p))
                grad_x = grad_x.view(ctx.x_shape)
        return grad if need_result else None, grad_x, grad_a, grad_b, None, None


def is_plain(layer: torch.nn.Module, types: tuple[type[torch.nn.Module], ...]) -> bool:
    """True when ``layer`` is exactly one of ``types`` (not a subclass with its own forward, e.g. a
    quantised Linear) and has no forward hooks, so its output can be computed from its weight directly."""
    return type(layer) in types and not layer._forward_hooks and not layer._forward_pre_hooks


def fused_dtype(x: torch.Tensor, *tensors: torch.Tensor | None) -> torch.dtype | None:
    """The dtype a fused path computes in: autocast's (for float inputs), else the common dtype of ``x``
    and ``tensors``; None when they differ outside autocast (the caller then takes the generic path, which
    casts as PEFT does)."""
    autocast = autocast_dtype(x.device.type)
    if autocast is not None:
        return autocast if x.is_floating_point() and x.dtype in (torch.float32, *_LOW_PRECISION) else None
    if all(t is None or t.dtype == x.dtype for t in tensors):
        return x.dtype
    return None


def low_rank_linear(
    layer: torch.nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float
) -> torch.Tensor | None:
    """:class:`LowRankLinear` for a plain ``nn.Linear`` base, or None where it does not apply (another layer
    type, hooks on the base, or mixed dtypes outside autocast: the caller then takes the generic path)."""
    if not isinstance(layer, torch.nn.Linear) or not is_plain(layer, (torch.nn.Linear,)):
        return None
    dtype = fused_dtype(x, layer.weight, a, b)
    if dtype is None:
        return None
    return LowRankLinear.apply(x, layer.weight, layer.bias, a, b, scale, dropout, dtype)  # type: ignore[no-any-return]


def low_rank_add(
    result: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``result + scale · (dropout(x) Aᵀ) Bᵀ`` for a Linear, as one node where the dtypes allow.

    Args:
        result: The base output (..., out).
        x: The layer input (..., in).
        a: (r, in), already including any per-rank factor (AdaLoRA's E and 1/ranknum).
        b: (out, r).
        scale: The scalar s.
        dropout: Dropout probability on the adapter's input, applied only when > 0 (callers pass 0 in eval).

    Returns:
        A new tensor of ``result``'s shape and dtype.
    """
    dtype = fused_dtype(x, a, b)
    if dtype is None or result.dtype != dtype:  # mixed dtypes: PEFT's order (cast x to the adapter dtype)
        if dropout > 0:
            x = torch.nn.functional.dropout(x, dropout, training=True)
        delta = torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b) * scale
        return result + delta.to(result.dtype)
    return LowRankAdd.apply(result, x, a, b, scale, dropout)  # type: ignore[no-any-return]


def merged_weight_pays(
    x: torch.Tensor,
    weight: torch.Tensor,
    tokens: int,
    factored_macs_per_token: float | None,
    build_macs: float,
    training: bool,
) -> bool:
    """Whether ``base_op(x, W + ΔW)`` is the cheaper way to add the adapter term for this call.

    Only when the stored weight is fp32/fp64: then W + ΔW is formed at full precision, which equals the
    separate terms up to rounding, and under autocast it is rounded to bf16/fp16 for the GEMM exactly as
    autocast rounds W itself (mixed-precision "master weight" semantics). A bf16/fp16 stored weight
    would round ΔW away against W, so the factored term is kept there. Merged, the forward and the input gradient
    cost what the frozen base costs; training adds one weight-gradient GEMM (tokens · out · in MACs)
    and building ΔW (``build_macs``, ~3x in training). The factored term costs
    ``factored_macs_per_token`` per token (×3 in training); ``None`` means there is none (materialise).

    Args:
        x: The layer input.
        weight: The base weight.
        tokens: Rows of the GEMM (tokens, or output pixels of a conv).
        factored_macs_per_token: Bandwidth-weighted MACs per token of the factored path, or None.
        build_macs: MACs to build ΔW once.
        training: Whether gradients will flow to the adapter.
    """
    if weight.dtype not in (torch.float32, torch.float64):
        return False
    if x.dtype != weight.dtype and autocast_dtype(x.device.type) is None:
        return False
    if factored_macs_per_token is None:
        return True
    dense = weight.numel()
    if training:
        return tokens * dense + 3 * build_macs < 3 * tokens * factored_macs_per_token
    return build_macs + dense < tokens * factored_macs_per_token


#: The two skinny GEMMs of a low-rank term are bandwidth-bound (they read x and rewrite the output):
#: on CPU they cost about this many times their MAC count against a dense GEMM (measured at ViT q/v).
LOW_RANK_BANDWIDTH_FACTOR = 2.0


def low_rank_merge_pays(x: torch.Tensor, weight: torch.Tensor, rank: int, adapter_needs_grad: bool) -> bool:
    """Whether, in inference, ``linear(x, W + s B A)`` beats the base GEMM plus the low-rank pair.

    Building ΔW costs r·out·in once; the low-rank pair costs r·(in+out) per token (bandwidth-weighted),
    so merging on the fly wins from a few hundred tokens on (a ViT batch), and never for one-token
    decoding. Training keeps :class:`LowRankLinear`, whose weight gradient stays low-rank.
    """
    if adapter_needs_grad or weight.dim() != 2:
        return False
    out_dim, in_dim = weight.shape
    per_token = LOW_RANK_BANDWIDTH_FACTOR * rank * (in_dim + out_dim)
    tokens = x.numel() // max(1, x.shape[-1])
    return merged_weight_pays(x, weight, tokens, per_token, float(rank * weight.numel()), training=False)
