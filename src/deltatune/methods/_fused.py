"""Fast paths shared by the methods: low-rank terms fused with the base GEMM, and the choice between a
factored adapter term and a per-step merged weight W + ΔW.

Everything here computes the adapter maths of the method modules exactly (up to floating-point rounding
order); the methods decide when a path applies, and fall back to their plain formulas otherwise.

- :class:`LowRankLinear` (LoRA, AdaLoRA on a plain ``nn.Linear`` in fp32/fp64): the base GEMM and
  ``s · (dropout(x) Aᵀ) Bᵀ`` in one autograd node. The low-rank term accumulates in place into the base
  output and, in backward, the adapter's input gradient into the base's, so no N×in or N×out
  temporaries are added or accumulated separately.
- Dropout (both low-rank paths) draws its keep-mask from 31-bit integers (about 4x cheaper than
  ``nn.Dropout`` on CPU), never keeps the dropped N×in copy (it saves the input, which q and v share, and
  a 1-byte mask) and folds 1/(1−p) into the GEMM's scale.
- :func:`low_rank_add`: the same term added to an existing base output (under autocast, or for mixed
  dtypes), as one GEMM-accumulate.
- :func:`merged_weight_pays`: whether ``base_op(x, W + ΔW)`` (one GEMM, plus one weight-gradient GEMM in
  training) beats the method's factored term for this call; used by LoHa and LoKr.
"""

from __future__ import annotations

import torch

__all__ = [
    "DropoutLowRank",
    "LowRankLinear",
    "dropout_keep_mask",
    "is_plain",
    "low_rank_add",
    "low_rank_linear",
    "low_rank_merge_pays",
    "merged_weight_pays",
]

_TWO_31 = 2**31


def dropout_keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool mask that keeps each entry independently with probability 1 − p (to within 2⁻³¹).

    Draws one uniform integer in [0, 2³¹) per entry from the default generator of ``device`` (so
    ``torch.manual_seed`` makes it reproducible) and keeps entries at or above round(p · 2³¹).
    """
    if torch.compiler.is_compiling():  # dynamo cannot trace the in-place random_ (2x slower in eager)
        bits = torch.randint(0, _TWO_31, shape, dtype=torch.int32, device=device)
    else:
        bits = torch.empty(shape, dtype=torch.int32, device=device).random_()
    return bits >= round(p * _TWO_31)


def _as_float_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # bool → uint8 is a free view; uint8 → float converts vectorised (bool → float does not on CPU).
    return keep.view(torch.uint8).to(dtype)


class DropoutLowRank(torch.autograd.Function):
    """``result + s/(1−p) · ((x ⊙ m) Aᵀ) Bᵀ`` with a fresh Bernoulli(1−p) keep-mask m.

    Shapes: result (..., out), x (..., in), a (r, in), b (out, r). Saves x, the bool mask, the (N, r)
    hidden product and the factors; the N×in masked copy is recomputed in backward for ∂A.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        result: torch.Tensor,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        p: float,
    ) -> torch.Tensor:
        dtype = result.dtype
        keep = dropout_keep_mask(x.shape, p, x.device)
        xm = (x.to(dtype) * _as_float_mask(keep, dtype)).reshape(-1, x.shape[-1])
        hidden = torch.mm(xm, a.to(dtype).t())
        s = scale / (1.0 - p)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden, b.to(dtype).t(), alpha=s)
        ctx.save_for_backward(x, keep, hidden, a, b)
        ctx.s = s  # type: ignore[attr-defined]
        return out.view(result.shape)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, keep, hidden, a, b = ctx.saved_tensors  # type: ignore[attr-defined]
        s: float = ctx.s  # type: ignore[attr-defined]
        need = ctx.needs_input_grad  # type: ignore[attr-defined]
        dtype = grad.dtype
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_a = grad_b = None
        if need[3]:
            grad_b = torch.mm(g.t(), hidden).mul_(s).to(b.dtype)
        if need[1] or need[2]:
            mask = _as_float_mask(keep, dtype)
            gh = torch.mm(g, b.to(dtype)).mul_(s)  # (N, r)
            if need[2]:
                xm = x.to(dtype) * mask
                grad_a = torch.mm(gh.t(), xm.reshape(-1, x.shape[-1])).to(a.dtype)
            if need[1]:
                grad_x = torch.mm(gh, a.to(dtype)).view(x.shape).mul_(mask).to(x.dtype)
        return grad if need[0] else None, grad_x, grad_a, grad_b, None, None


class LowRankLinear(torch.autograd.Function):
    """A whole adapted Linear in one node: ``y = x Wᵀ + bias + s · ((x ⊙ m/(1−p)) Aᵀ) Bᵀ``.

    Shapes: x (..., in), weight (out, in), bias (out,) or None, a (r, in), b (out, r); m is a fresh
    Bernoulli(1−p) keep-mask when p > 0. The low-rank term accumulates in place into the base GEMM's
    output, and in backward the adapter's input gradient accumulates in place into the base's
    (``dx = g W + s (g B) A``), saving two N×in and one N×out pass per layer against separate autograd
    nodes. Saves x, the weight, the (N, r) hidden product, the factors and (with dropout) a 1-byte mask.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        p: float,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        keep = None
        xm = x2
        if p > 0:
            keep = dropout_keep_mask(x2.shape, p, x.device)
            xm = x2 * _as_float_mask(keep, x.dtype)
        hidden = torch.mm(xm, a.t())
        s = scale / (1.0 - p)
        y.addmm_(hidden, b.t(), alpha=s)
        ctx.save_for_backward(x2, weight, keep, hidden, a, b)  # type: ignore[arg-type]  # None is allowed
        ctx.s = s  # type: ignore[attr-defined]
        ctx.x_shape = x.shape  # type: ignore[attr-defined]
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x2, weight, keep, hidden, a, b = ctx.saved_tensors  # type: ignore[attr-defined]
        s: float = ctx.s  # type: ignore[attr-defined]
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]  # type: ignore[attr-defined]
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        mask = None if keep is None else _as_float_mask(keep, g.dtype)
        if need_b:
            grad_b = torch.mm(g.t(), hidden).mul_(s)
        if need_x or need_a:
            gh = torch.mm(g, b).mul_(s)  # (N, r)
            if need_a:
                grad_a = torch.mm(gh.t(), x2 if mask is None else x2 * mask)
            if need_x:
                grad_x = torch.mm(g, weight)
                if mask is None:
                    grad_x.addmm_(gh, a)
                else:
                    grad_x.addcmul_(torch.mm(gh, a), mask)
                grad_x = grad_x.view(ctx.x_shape)  # type: ignore[attr-defined]
        if need_w:
            grad_w = torch.mm(g.t(), x2)
        if need_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


def is_plain(layer: torch.nn.Module, types: tuple[type[torch.nn.Module], ...]) -> bool:
    """True when ``layer`` is exactly one of ``types`` (not a subclass with its own forward, e.g. a
    quantised Linear) and has no forward hooks, so its output can be computed from its weight directly."""
    return type(layer) in types and not layer._forward_hooks and not layer._forward_pre_hooks


def low_rank_linear(
    layer: torch.nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float
) -> torch.Tensor | None:
    """:class:`LowRankLinear` for a plain ``nn.Linear`` base, or None where it does not apply (another
    layer type, hooks on the base, autocast, or mixed dtypes: the caller then takes the generic path)."""
    if not is_plain(layer, (torch.nn.Linear,)):
        return None
    weight, bias = layer.weight, layer.bias
    if _autocast_dtype(x.device.type) is not None or not (x.dtype == weight.dtype == a.dtype == b.dtype):
        return None
    return LowRankLinear.apply(x, weight, bias, a, b, scale, dropout)  # type: ignore[no-any-return]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def low_rank_add(
    result: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``result + scale · (dropout(x) Aᵀ) Bᵀ`` for a Linear, fused where the dtypes allow.

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
    autocast = _autocast_dtype(x.device.type)
    compute = autocast if autocast is not None else a.dtype
    fusable = result.dtype == compute and (autocast is not None or x.dtype == a.dtype == b.dtype)
    if not fusable:  # mixed dtypes without autocast: PEFT's order (cast x to the adapter dtype)
        if dropout > 0:
            x = torch.nn.functional.dropout(x, dropout, training=True)
        delta = torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b) * scale
        return result + delta.to(result.dtype)
    if dropout > 0:
        return DropoutLowRank.apply(result, x, a, b, scale, dropout)  # type: ignore[no-any-return]
    hidden = torch.nn.functional.linear(x.to(compute), a.to(compute))
    out2d = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        hidden.reshape(-1, hidden.shape[-1]),
        b.to(compute).t(),
        alpha=scale,
    )
    return out2d.view(result.shape)


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
    if x.dtype != weight.dtype and _autocast_dtype(x.device.type) is None:
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
