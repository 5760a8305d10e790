"""Fast paths shared by the methods: low-rank terms fused with the base GEMM, and the choice between a
factored adapter term and a per-step merged weight W + ΔW.

Everything here computes the adapter maths of the method modules exactly (up to floating-point rounding
order); the methods decide when a path applies, and fall back to their plain formulas otherwise.

On a GPU an adapter step is mostly host-bound: its cost is the operations it issues (each a dispatcher call
and usually a kernel launch), not its FLOPs. So the low-rank paths issue as few operations as they can, and
only built-in ones, whose backward runs in C++ (a Python ``autograd.Function`` saves a few kernels but costs
more host time than it saves: measured with ``python -m benchmarks.ops``):

- :func:`low_rank_linear` (LoRA, AdaLoRA, DoRA on a plain ``nn.Linear``): ``y = x Wᵀ + bias``, then
  ``y += s · (drop(x) Aᵀ) Bᵀ`` accumulated in place by one ``addmm_`` with the scale as its ``alpha`` (no
  N×out temporary, no separate multiply or add).
- **Autocast**: the layer input is cast to the autocast dtype once, for both GEMMs (an unfused adapter casts
  it for the base GEMM and again for its own); the weights are cast by autocast as for the base model.
- **Dropout is one op** on CUDA (``F.dropout``: the fused ``native_dropout`` kernel, a 1-byte mask; CPU eager
  draws its mask faster and folds the 1/(1−p) into the GEMM's alpha, see :func:`_dropout`) and none at all
  when p = 0 or in eval. No dtype views of bool masks: everything here compiles with ``torch.compile``.
- :func:`low_rank_add`: the same term added to an existing base output (a base layer with hooks or a
  subclass with its own forward) by one ``addmm``.
- :func:`merged_weight_pays`: whether ``base_op(x, W + ΔW)`` (one GEMM, plus one weight-gradient GEMM in
  training) beats the method's factored term for this call; used by LoHa and LoKr.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "LOW_RANK_BANDWIDTH_FACTOR",
    "adapter_input",
    "autocast_dtype",
    "cpu_keep_mask",
    "dropout_keep_mask",
    "fused_dtype",
    "is_plain",
    "low_rank_add",
    "low_rank_gemms",
    "low_rank_linear",
    "low_rank_merge_pays",
    "merged_weight_pays",
    "runs_hooks",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on ``device_type``, or None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def adapter_input(x: torch.Tensor, dtype: torch.dtype, cast: bool = True) -> torch.Tensor:
    """``x`` for an adapter's own matrix products: as is under autocast (which casts it in each product,
    so an explicit up-cast to the fp32 factors' dtype would only add a copy and then a down-cast) or without
    ``cast`` (the layer's ``cast_input_dtype_enabled`` off), else cast to the adapter's ``dtype`` as PEFT does."""
    if not cast or x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)


def dropout_keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str
) -> torch.Tensor:
    """The bool keep-mask that the fast paths' dropout draws for a tensor of ``shape`` from the current RNG
    state (entries kept with probability 1 − p); for tests that rebuild a fused path's mask."""
    return _dropout(torch.ones(shape, device=device), p)[0] != 0


_TWO_32 = 2**32


def _cpu_keep_mask(shape: torch.Size, p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 0/1 mask of ``shape`` in ``dtype``, each entry 1 with probability 1 − p to within 2⁻³³, from the CPU RNG.

    Each 64-bit draw of ``random_(-2**63, None)`` (all 64 bits uniform) is read as two 32-bit words, each
    compared with a threshold in place (``ge_``): half as many generator draws as one 31-bit draw per entry.
    For fp32 the 0/1 words then become the bit patterns of 0.0 and 1.0 in place (times 0x3F800000), so the
    draws' buffer is the mask: no tensor is allocated after the draws. Measured on ViT-Small's adapter input
    (1576 x 384, one thread): a comparison into a bool tensor takes as long as the draws themselves, a bool or
    uint8 mask makes the multiply that applies it (and its backward) allocate a converted copy of the mask or
    run several times slower (``where``), and on a VM each fresh buffer of that size costs milliseconds in page
    faults; this path draws, compares and applies in about half the time of a bool mask and a ``where``."""
    last = shape[-1]
    draws = torch.empty((*shape[:-1], (last + 1) // 2), dtype=torch.int64).random_(-(2**63), None)
    words = draws.view(torch.int32)
    if words.shape[-1] != last:
        words = words[..., :last]
    words.ge_(min(round(p * _TWO_32), _TWO_32 - 1) - 2**31)  # never past the int32 range (p < 1)
    if dtype == torch.float32:
        return words.mul_(_FP32_ONE_BITS).view(torch.float32)
    return words.to(dtype)


#: The bit pattern of 1.0 in IEEE-754 single precision.
_FP32_ONE_BITS = 0x3F800000


#: Below this many entries CPU dropout stays ``F.dropout`` (see :func:`_dropout`). LoRA training steps,
#: one thread: a tiny ViT at 32 px (hundreds of entries per call) ran 4% faster with ``F.dropout``, ViT-Small
#: at 224 px, batch 1 (75k entries per call) 2% faster with the integer mask; the op alone breaks even near
#: 10k entries.
CPU_MASK_MIN_NUMEL = 1 << 14


def cpu_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor | None:
    """The 0/1 keep-mask in ``x``'s dtype that :func:`_dropout` multiplies ``x`` by (``factor · x · mask`` is
    the dropped input, factor 1/(1−p)), or None where it uses ``F.dropout`` instead (p = 0, not CPU, small tensors, compiling).
    For a fused path that applies the mask itself (DoRA's, which folds the mask's backward into its input
    gradient)."""
    if p <= 0 or x.device.type != "cpu" or x.numel() < CPU_MASK_MIN_NUMEL or torch.compiler.is_compiling():
        return None
    return _cpu_keep_mask(x.shape, p, x.dtype)


def _dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Input dropout as ``(dropped, factor)``: ``factor · dropped`` is x with entries zeroed with probability p
    and the rest scaled by 1/(1−p); ``(x, 1.0)`` when p = 0. Callers fold ``factor`` into the scale they
    already apply (a GEMM's ``alpha``), so the rescaling costs no op of its own.

    On CUDA (and under ``torch.compile``) ``F.dropout``, factor 1: one fused ``native_dropout`` kernel saving
    a 1-byte mask. In CPU eager mode, for tensors of at least :data:`CPU_MASK_MIN_NUMEL` entries, a uniform
    32-bit word per entry compared with a threshold (:func:`_cpu_keep_mask`) then one multiply by the 0/1
    mask, factor 1/(1−p): CPU ``bernoulli_`` (inside ``F.dropout``) costs about 3x this forward, and
    the multiply's backward is one multiply by the saved mask (in x's dtype: 4 bytes an entry for fp32 where
    ``native_dropout`` saves 1, the price of allocating nothing while drawing it). Smaller CPU
    tensors keep ``F.dropout``: there its one dispatcher call is cheaper than the three that replace it."""
    if p <= 0:
        return x, 1.0
    keep = cpu_keep_mask(x, p)
    if keep is not None:
        return x * keep, 1.0 / (1.0 - p)
    return F.dropout(x, p, True), 1.0


def _global_hooks() -> bool:
    """Whether module hooks are registered for every module (``register_module_forward_hook`` & co.)."""
    hooks = torch.nn.modules.module
    return bool(
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def _own_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's forward: its own forward or backward hooks, or a
    forward replaced on the instance (accelerate's offloading hooks do that, and ``_hf_hook`` marks them)."""
    if (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    ):
        return True
    own = module.__dict__
    return "forward" in own or "_hf_hook" in own


def runs_hooks(*modules: torch.nn.Module) -> bool:
    """Whether calling any of ``modules`` would run hooks (their own, a replaced forward, or global ones): a
    fast path that reads their weights instead of calling them must then call them, so that offloading,
    sharding, casting and debugging hooks see the call. A few dict lookups per module."""
    return any(_own_hooks(module) for module in modules) or _global_hooks()


def is_plain(layer: torch.nn.Module, types: tuple[type[torch.nn.Module], ...]) -> bool:
    """True when ``layer``'s output can be computed from its weight directly, skipping its ``forward``: it is
    exactly one of ``types`` (not a subclass with its own forward, e.g. a quantised Linear), runs no hooks
    (:func:`runs_hooks`) and has no weight still on the meta device."""
    if type(layer) not in types or runs_hooks(layer):
        return False
    weight = getattr(layer, "weight", None)
    return not (isinstance(weight, torch.Tensor) and weight.is_meta)


def fused_dtype(x: torch.Tensor, *tensors: torch.Tensor | None) -> torch.dtype | None:
    """The dtype a fused path computes in: autocast's (for float inputs), else the common dtype of ``x``
    and ``tensors``; None when they differ outside autocast (the caller then takes the generic path, which
    casts as PEFT does)."""
    autocast = autocast_dtype(x.device.type)
    if autocast is not None:
        return autocast if x.dtype in (torch.float32, *_LOW_PRECISION) else None
    if all(t is None or t.dtype == x.dtype for t in tensors):
        return x.dtype
    return None


def low_rank_linear(
    layer: torch.nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float
) -> torch.Tensor | None:
    """``x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ`` for a plain ``nn.Linear`` base, in three GEMMs (the last
    accumulating in place), or None where it does not apply (another layer type, hooks on the base, or mixed
    dtypes outside autocast: the caller then takes the generic path).

    Shapes: x (..., in), a (r, in) (any per-rank factor folded in), b (out, r).
    """
    if not isinstance(layer, torch.nn.Linear) or not is_plain(layer, (torch.nn.Linear,)):
        return None
    dtype = fused_dtype(x, layer.weight, a, b)
    if dtype is None:
        return None
    return low_rank_gemms(x, layer.weight, layer.bias, a, b, scale, dropout, dtype)


def low_rank_gemms(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    dropout: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ`` with x cast to ``dtype`` once (see :func:`fused_dtype`).

    Shapes: x (..., in), weight (out, in), bias (out,) or None, a (r, in), b (out, r) → (..., out).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # 2-D, so the accumulation below is in place on a tensor, not a view
    x2 = x2 if x2.dtype == dtype else x2.to(dtype)  # once, for both GEMMs
    y = F.linear(x2, weight, bias)
    dropped, factor = _dropout(x2, dropout)
    hidden = F.linear(dropped, a)
    b = b if b.dtype == y.dtype else b.to(y.dtype)  # in-place ops are not autocast
    y.addmm_(hidden, b.t(), alpha=scale * factor)
    return y.view(*lead, y.shape[-1])


def low_rank_add(
    result: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``result + scale · (dropout(x) Aᵀ) Bᵀ`` for a Linear, by one ``addmm`` where the dtypes allow.

    Args:
        result: The base output (..., out).
        x: The layer input (..., in).
        a: (r, in), already including any per-rank factor (AdaLoRA's E).
        b: (out, r).
        scale: The scalar s.
        dropout: Dropout probability on the adapter's input, applied only when > 0 (callers pass 0 in eval).

    Returns:
        A new tensor of ``result``'s shape and dtype.
    """
    dtype = fused_dtype(x, a, b)
    if dtype is None or result.dtype != dtype:  # mixed dtypes: PEFT's order (cast x to the adapter dtype)
        dropped, factor = _dropout(x, dropout)
        delta = F.linear(F.linear(dropped.to(a.dtype), a), b) * (scale * factor)
        return result + delta.to(result.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    dropped, factor = _dropout(x2 if x2.dtype == dtype else x2.to(dtype), dropout)
    hidden = F.linear(dropped, a)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden, b.t(), alpha=scale * factor)
    return out.view(result.shape)


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
    decoding. Training keeps :func:`low_rank_linear`, whose weight gradient stays low-rank.
    """
    if adapter_needs_grad or weight.dim() != 2:
        return False
    out_dim, in_dim = weight.shape
    per_token = LOW_RANK_BANDWIDTH_FACTOR * rank * (in_dim + out_dim)
    tokens = x.numel() // max(1, x.shape[-1])
    return merged_weight_pays(x, weight, tokens, per_token, float(rank * weight.numel()), training=False)
