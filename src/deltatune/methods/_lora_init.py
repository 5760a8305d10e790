"""LoRA's initialisers that read the base weight (PEFT's ``init_lora_weights`` strings), as pure functions,
and the conversion of such an adapter back to a plain LoRA adapter on save.

With W the base weight in (out, in) layout, s the scaling and r the rank:

- **PiSSA** (Meng et al., 2024): W = U S Vᵀ; A = √(S_r / s) V_rᵀ, B = U_r √(S_r / s), so s·B A is the best
  rank-r approximation of W. ``pissa_niter_N`` takes U_r, S_r, V_r from a randomized SVD with N subspace
  iterations (``torch.svd_lowrank``) instead of the full one.
- **OLoRA** (Büyükakyüz, 2024): W = Q R; B = Q[:, :r], A = R[:r].
- Both replace the base weight by the residual W − s·B A (computed in float32, stored in W's dtype), so the
  model's output at creation is the base model's.
- **orthogonal**: A and B from two halves of a random orthogonal r×r matrix, each mixed with Gaussian noise and
  divided by 10; the base weight is untouched (so the output at creation is *not* the base model's). r must be
  even. The random draws are made in PEFT's order, so a seed gives PEFT's tensors.

- **LoftQ** (Li et al., 2023): alternately quantize the weight left over by the adapter (NF4 in blocks of 64
  with one absmax each, as bitsandbytes' ``nf4``; or int8 per row) and take the rank-r SVD of what
  quantization lost: A = √S_r V_rᵀ, B = U_r √S_r (no scaling, as in PEFT); the base weight becomes the
  dequantized Q(W). Pure PyTorch on the weight's device: no bitsandbytes, no CUDA.

Only Linear and transformers' ``Conv1D`` layers take these initialisers (as in PEFT, whose Embedding layers fall
back to the default initialisation and whose conv layers refuse them).

Conversion (PEFT's ``path_initial_model_for_weight_conversion``): after training, W_res + s·B A = W + ΔW with
ΔW = s·(B A − B₀ A₀) = s·[B | −B₀] [A ; A₀], a plain LoRA adapter of rank 2r on the *original* W; keeping the
scaling s with rank 2r means alpha doubles (× √2 with rsLoRA).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layer_types import Conv1D, to_out_in
from ..layers import module_weight
from .lora import pissa_iterations

__all__ = [
    "base_initialised_factors",
    "converted_lora_tensors",
    "init_from_base",
    "loftq_factors",
    "mica_factors",
    "olora_factors",
    "orthogonal_factors",
    "pissa_factors",
    "quantize_dequantize",
]

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
#: The 16 levels of the NF4 data type (QLoRA; the values bitsandbytes uses).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NF4_BLOCK = 64


def quantize_dequantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(W) in float32: NF4 (``bits=4``; blocks of 64 consecutive values, each scaled by its absmax and rounded
    to the nearest level) or int8 (``bits=8``; per row, round(127 · x / absmax) · absmax / 127).

    Raises:
        ValueError: for other ``bits``.
    """
    w = weight.to(torch.float32)
    if bits == 8:
        absmax = w.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
        return torch.round(w / scale).clamp(-127, 127) * scale
    if bits != 4:
        raise ValueError("Only nf4 and int8 quantization is supported")
    flat = w.reshape(-1)
    pad = (-flat.numel()) % NF4_BLOCK
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=w.device)
    index = torch.bucketize(blocks / safe, (levels[1:] + levels[:-1]) / 2)
    return (levels[index] * absmax).reshape(-1)[: flat.numel()].view_as(w)


def loftq_factors(
    weight: torch.Tensor, r: int, bits: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's (A, B) in float32 and Q(W) in W's dtype, from W (out, in), so that Q(W) + B A ≈ W.

    Raises:
        ValueError: for ``bits`` other than 4 and 8 or fewer than one iteration.
    """
    if iterations <= 0:
        raise ValueError("Number of iterations must be greater than 0")
    w = weight.to(torch.float32)
    target, quantized = w, w
    for step in range(iterations):
        quantized = quantize_dequantize(target, bits)
        u, s, vh = torch.linalg.svd(w - quantized, full_matrices=False)
        root = torch.sqrt(s[:r])
        lora_a, lora_b = torch.diag(root) @ vh[:r], u[:, :r] @ torch.diag(root)
        if step + 1 < iterations:
            target = w - lora_b @ lora_a
    return lora_a, lora_b, quantized.to(weight.dtype)


def pissa_factors(
    weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's (A, B) in float32 from W (out, in): s·B A is W's rank-r SVD truncation.

    Args:
        weight: W in (out, in) layout, any float dtype (computed in float32).
        r: The rank.
        scaling: s.
        niter: Subspace iterations of the randomized SVD, or None for the full SVD.

    Returns:
        A (r, in) and B (out, r).
    """
    w = weight.to(torch.float32)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.t()
    root = torch.sqrt(s / scaling)
    return torch.diag(root) @ vh, u @ torch.diag(root)


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's (A, B) in float32 from W (out, in) = Q R: A = R[:r] (r, in), B = Q[:, :r] (out, r)."""
    q, rr = torch.linalg.qr(weight.to(torch.float32))
    return rr[:r].contiguous(), q[:, :r].contiguous()


def orthogonal_factors(in_features: int, out_features: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthogonal initialiser's (A, B) in float32, drawn from the global generator in PEFT's order.

    Raises:
        ValueError: when r is odd.
    """
    if r % 2:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    lora_a = torch.randn(in_features, r // 2).mm(q[0::2, :]).t() / 10.0
    lora_b = torch.randn(r // 2, out_features).t().mm(q[1::2, :]) / 10.0
    return lora_a.contiguous(), lora_b.contiguous()


def base_initialised_factors(
    weight: torch.Tensor, init: str, r: int, scaling: float, loftq: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A, B, new base W or None) for ``init`` from W (out, in); A, B in float32, the new W in W's dtype.

    Args:
        weight: W in (out, in) layout.
        init: ``"pissa"``, ``"pissa_niter_N"``, ``"olora"``, ``"orthogonal"``, ``"loftq"`` or ``"mica"``.
        r: The rank.
        scaling: s (not used by LoftQ and orthogonal).
        loftq: LoftQ's ``loftq_bits`` and ``loftq_iter`` (PEFT's ``loftq_config``).

    Raises:
        TypeError: when W is not float32, float16 or bfloat16.
        ValueError: for an unknown ``init``, or a rank above min(out, in) for PiSSA/OLoRA.
    """
    out_features, in_features = weight.shape
    if init == "orthogonal":
        a, b = orthogonal_factors(in_features, out_features, r)
        return a, b, None
    if weight.dtype not in _FLOAT_TYPES:
        raise TypeError(
            f"init_lora_weights={init!r} needs a float32, float16 or bfloat16 base weight, got "
            f"{str(weight.dtype).removeprefix('torch.')}; initialise before quantizing"
        )
    if init == "mica":
        a, b = mica_factors(weight, r)
        return a, b, None
    if r > min(out_features, in_features):
        raise ValueError(
            f"init_lora_weights={init!r} needs r <= min(out, in) = {min(out_features, in_features)} for a "
            f"{out_features}x{in_features} weight, got r={r}"
        )
    if init == "loftq":
        options = loftq or {}
        return loftq_factors(weight, r, options.get("loftq_bits", 4), options.get("loftq_iter", 1))
    if init == "olora":
        a, b = olora_factors(weight, r)
    else:
        a, b = pissa_factors(weight, r, scaling, pissa_iterations(init))
    residual = (weight.to(torch.float32) - scaling * b @ a).to(weight.dtype)
    return a, b, residual


def mica_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MiCA's (A, B) in float32 for W (out, in): A = 0 (r, in) and B (out, r) the left singular vectors of the r
    smallest singular values, rounded through W's dtype as PEFT stores them.

    Raises:
        ValueError: when r > min(out, in).
    """
    if r > min(weight.shape):
        raise ValueError(
            f"MiCA requires `r` <= min(in_features, out_features) but got r={r} for a layer with weight shape "
            f"{tuple(weight.shape)} (max usable r is {min(weight.shape)})."
        )
    u = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)[0]
    b = u[:, -r:].to(weight.dtype).to(torch.float32)
    return torch.zeros(r, weight.shape[1], device=weight.device), b


def init_from_base(
    base: nn.Module,
    lora_a: nn.Module,
    lora_b: nn.Module,
    init: str,
    r: int,
    scaling: float,
    loftq: dict[str, Any] | None = None,
) -> None:
    """Initialises the factor layers ``lora_a`` (in → r) and ``lora_b`` (r → out) of an adapter on ``base`` by
    ``init`` (PiSSA, OLoRA, orthogonal, LoftQ) and, for PiSSA and OLoRA, writes the residual into the base
    weight (LoftQ: Q(W)). The factors keep their dtype (cast from float32).

    Raises:
        ValueError: when ``base`` is not a Linear or ``Conv1D`` (and see :func:`base_initialised_factors`).
    """
    if not isinstance(base, nn.Linear | Conv1D):
        raise ValueError(
            f"init_lora_weights={init!r} supports Linear and Conv1D layers, not {type(base).__name__}; "
            "leave this layer out of target_modules or use another initialisation"
        )
    base_weight = module_weight(base)
    with torch.no_grad():
        a, b, new_base = base_initialised_factors(to_out_in(base, base_weight), init, r, scaling, loftq)
        module_weight(lora_a).copy_(a)
        module_weight(lora_b).copy_(b)
        if new_base is not None:
            base_weight.copy_(new_base.t() if isinstance(base, Conv1D) else new_base)


def converted_lora_tensors(
    trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The plain LoRA tensors of rank 2r for ΔW = s·(B A − B₀ A₀): A' = [A ; A₀], B' = [B | −B₀].

    Args:
        trained: The trained adapter's state dict (PEFT keys).
        initial: The adapter's state dict at initialisation (same keys).

    Returns:
        The ``lora_A``/``lora_B`` entries only (as PEFT writes them).

    Raises:
        ValueError: when a key of ``trained`` is missing from ``initial``.
    """
    missing = [k for k in trained if ("lora_A" in k or "lora_B" in k) and k not in initial]
    if missing:
        raise ValueError(
            f"the initial adapter has no tensor {missing[0]!r}; pass the folder the adapter was saved to right "
            "after initialisation"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in trained.items():
        if "lora_A" in key:
            out[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif "lora_B" in key:
            out[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
    return out


def converted_config_data(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config's fields for the converted adapter: rank 2r, the same scaling, default initialisation."""
    data = dict(data)
    data["init_lora_weights"] = True
    data["r"] = 2 * data["r"]
    data["lora_alpha"] = data["lora_alpha"] * (2**0.5 if data.get("use_rslora") else 2)
    for name in ("rank_pattern", "alpha_pattern"):
        if data.get(name):
            data[name] = {key: 2 * value for key, value in data[name].items()}
    return data
