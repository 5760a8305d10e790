"""``add_weighted_adapter`` for LoRA: a new adapter made from a weighted combination of existing ones, with
PEFT's combination types.

Exact:
- ``"cat"``: the factors side by side, A' = [w₁s₁A₁; w₂s₂A₂; …], B' = [B₁ B₂ …], so B'A' = Σ wᵢ sᵢ BᵢAᵢ
  (rank Σ rᵢ, scale 1);
- ``"svd"``: Σ wᵢ ΔWᵢ truncated to ``svd_rank`` (default the largest rank) by an SVD (exact when that rank
  suffices). ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"`` combine the
  ΔWᵢ with the merging rule first.

Approximate (same rank required):
- ``"linear"``: A' = Σ √|wᵢsᵢ|·sign(wᵢsᵢ)·Aᵢ, B' = Σ √|wᵢsᵢ|·Bᵢ (exact for a single adapter);
- ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: the same per-factor combination with
  the merging rule (TIES: Yadav et al., 2023; DARE: Yu et al., 2023).

The new adapter is added inactive, with ``lora_alpha = r`` (scale 1) and the union of the targets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..layers import RankedLayer

__all__ = [
    "COMBINATION_TYPES",
    "add_weighted_adapter",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "task_arithmetic",
    "ties",
]

COMBINATION_TYPES = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
_PER_FACTOR = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


# ---- merging rules over a stack of task tensors ---------------------------------------------------
def _weights_like(weights: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    return weights.to(stack).reshape(-1, *([1] * (stack.dim() - 1)))


def task_arithmetic(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ wᵢ τᵢ."""
    stack = torch.stack(tensors)
    return (stack * _weights_like(weights, stack)).sum(0)


def _magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the ``density`` fraction of entries largest in magnitude."""
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    if keep > 0:
        mask[tensor.abs().reshape(-1).topk(keep).indices] = True
    return mask.reshape(tensor.shape)


def _random_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    return torch.bernoulli(torch.full_like(tensor, density)).bool()


def _check_density(density: float | None) -> float:
    if density is None or not 0.0 <= density <= 1.0:
        raise ValueError(f"density={density!r} must be a number in [0, 1] for this combination_type")
    return float(density)


def magnitude_prune(
    tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None
) -> torch.Tensor:
    """Task arithmetic over tensors pruned to their ``density`` largest-magnitude entries."""
    d = _check_density(density)
    return task_arithmetic([t * _magnitude_mask(t, d) for t in tensors], weights)


def _dare(tensors: list[torch.Tensor], density: float) -> list[torch.Tensor]:
    """DARE's drop-and-rescale: keep each entry with probability ``density``, divide by it."""
    return [t * _random_mask(t, density) / max(density, 1e-12) for t in tensors]


def dare_linear(tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None) -> torch.Tensor:
    """Task arithmetic after DARE."""
    return task_arithmetic(_dare(tensors, _check_density(density)), weights)


def _elect_and_merge(stack: torch.Tensor, weights: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    """TIES' sign election (by total mass or by count) and disjoint mean of the weighted entries that agree."""
    if majority_sign_method == "total":
        mass = stack.sum(0)
    elif majority_sign_method == "frequency":
        mass = stack.sign().sum(0)
    else:
        raise ValueError(f"majority_sign_method={majority_sign_method!r}; choose 'total' or 'frequency'")
    elected = torch.where(mass >= 0, 1.0, -1.0).to(stack)
    agree = stack.sign() == elected
    weighted = stack * _weights_like(weights, stack)
    total = (weighted * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


def ties(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """TIES-merging: trim to the largest-magnitude ``density`` fraction, elect signs, average the agreeing."""
    d = _check_density(density)
    stack = torch.stack([t * _magnitude_mask(t, d) for t in tensors])
    return _elect_and_merge(stack, weights, majority_sign_method)


def dare_ties(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """TIES' sign election and disjoint mean after DARE's random drop."""
    stack = torch.stack(_dare(tensors, _check_density(density)))
    return _elect_and_merge(stack, weights, majority_sign_method)


def _combine(
    kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None, sign_method: str
) -> torch.Tensor:
    base = kind.removesuffix("_svd")
    if base in ("svd", "linear"):
        return task_arithmetic(tensors, weights)
    if base == "ties":
        return ties(tensors, weights, density, sign_method)
    if base == "dare_linear":
        return dare_linear(tensors, weights, density)
    if base == "dare_ties":
        return dare_ties(tensors, weights, density, sign_method)
    return magnitude_prune(tensors, weights, density)


# ---- the tuner operation ---------------------------------------------------------------------------------
def _factors(layer: RankedLayer, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) weights of ``name`` in ``layer`` (module or plain parameters), or None if it does not hold it."""
    if name not in layer.r:
        return None
    factor_weights = getattr(layer, "factor_weights", None)
    if not callable(factor_weights):
        return None
    a, b = factor_weights(name)
    return a, b


def _checked_rank(tuner: Any, adapters: list[str], combination_type: str, svd_rank: int | None) -> int:
    ranks = []
    for name in adapters:
        config = tuner.peft_config[name]
        ranks.append(max([config.r, *(config.rank_pattern or {}).values()]))
    if combination_type in _PER_FACTOR:
        if len(set(ranks)) != 1:
            raise ValueError(
                "All adapters must have the same r value when using combination_type linear, ties, dare_ties, "
                f"dare_linear or magnitude_prune (ranks: {dict(zip(adapters, ranks, strict=True))}); use 'cat' or 'svd'"
            )
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def _union_targets(tuner: Any, adapters: list[str]) -> Any:
    targets = [tuner.peft_config[a].target_modules for a in adapters]
    if len({type(t) for t in targets}) > 1:
        raise ValueError(
            "all adapter configs should follow the same target modules type. Combining adapters with "
            "`target_modules` type being a mix of list/set and string is not supported."
        )
    if isinstance(targets[0], str):
        return "|".join(f"({t})" for t in targets)
    return set().union(*targets)


def add_weighted_adapter(
    tuner: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """See the module docstring; an existing ``adapter_name`` is left alone (as in PEFT).

    Raises:
        ValueError: for unknown adapters or combination types, mismatched ranks for the per-factor types,
            mixed target types, several adapters holding copies of one ``modules_to_save`` module, or a
            ``density`` outside [0, 1] where one is needed.
    """
    if adapter_name in tuner.peft_config:
        return
    missing = [a for a in adapters if a not in tuner.peft_config]
    if missing:
        raise ValueError(f"Adapter {missing[0]} does not exist; adapters: {sorted(tuner.peft_config)}")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type: {combination_type!r}; choose one of {COMBINATION_TYPES}")
    shared = [
        n for n, w in tuner.saved_module_wrappers() if sum(a in w.modules_to_save for a in adapters) > 1
    ]
    if shared:
        raise ValueError(
            "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
            f"{len(shared)} such instance(s)."
        )
    kind = "linear" if len(adapters) == 1 else combination_type
    rank = _checked_rank(tuner, adapters, kind, svd_rank)
    first = tuner.peft_config[adapters[0]]
    config = dataclasses.replace(
        first,
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        target_modules=_union_targets(tuner, adapters),
        rank_pattern={},
        alpha_pattern={},
        modules_to_save=sorted({m for a in adapters for m in (tuner.peft_config[a].modules_to_save or [])})
        or None,
        inference_mode=True,
    )
    tuner.inject_adapter(adapter_name, config)
    for _, wrapper in tuner.saved_module_wrappers():  # the one adapter's trained copy carries over
        sources = [a for a in adapters if a in wrapper.modules_to_save]
        if sources and adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter_name].load_state_dict(
                wrapper.modules_to_save[sources[0]].state_dict()
            )
    for _, layer in tuner.adapter_layers():
        new = _factors(layer, adapter_name)
        if new is None:
            continue
        held = [(a, w) for a, w in zip(adapters, weights, strict=True) if _factors(layer, a) is not None]
        with torch.no_grad():
            new[0].zero_()
            new[1].zero_()
            if not held:
                continue
            if kind == "cat":
                _fill_cat(layer, held, new)
            elif kind in _PER_FACTOR:
                _fill_per_factor(layer, held, new, kind, density, majority_sign_method)
            else:
                _fill_svd(
                    layer,
                    held,
                    new,
                    kind,
                    rank,
                    density,
                    majority_sign_method,
                    svd_clamp,
                    svd_full_matrices,
                    svd_driver,
                )


def _fill_cat(
    layer: RankedLayer, held: list[tuple[str, float]], new: tuple[torch.Tensor, torch.Tensor]
) -> None:
    row = 0
    for name, weight in held:
        factors = _factors(layer, name)
        assert factors is not None
        a, b = factors
        r = a.shape[0]
        new[0][row : row + r] = (a * (weight * layer.scaling[name])).to(new[0].dtype)
        new[1][:, row : row + r] = b.to(new[1].dtype)
        row += r


def _fill_per_factor(
    layer: RankedLayer,
    held: list[tuple[str, float]],
    new: tuple[torch.Tensor, torch.Tensor],
    kind: str,
    density: float | None,
    sign_method: str,
) -> None:
    a_list, b_list, wa, wb = [], [], [], []
    for name, weight in held:
        factors = _factors(layer, name)
        assert factors is not None
        scaled = weight * layer.scaling[name]
        root = math.sqrt(abs(scaled))
        wa.append(root if scaled >= 0 else -root)  # the sign goes on one factor only
        wb.append(root)
        a_list.append(factors[0].float())
        b_list.append(factors[1].float())
    new[0].copy_(_combine(kind, a_list, torch.tensor(wa), density, sign_method).to(new[0].dtype))
    new[1].copy_(_combine(kind, b_list, torch.tensor(wb), density, sign_method).to(new[1].dtype))


def _fill_svd(
    layer: RankedLayer,
    held: list[tuple[str, float]],
    new: tuple[torch.Tensor, torch.Tensor],
    kind: str,
    rank: int,
    density: float | None,
    sign_method: str,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
) -> None:
    deltas = []
    for name, _ in held:
        factors = _factors(layer, name)
        assert factors is not None
        a, b = factors
        deltas.append(
            (b.reshape(b.shape[0], -1).float() @ a.reshape(a.shape[0], -1).float()) * layer.scaling[name]
        )
    delta = _combine(kind, deltas, torch.tensor([w for _, w in held]), density, sign_method)
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, s.shape[0])
    u = u[:, :k] * s[:k]
    vh = vh[:k]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.reshape(-1), vh.reshape(-1)]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    a_new, b_new = new
    a_new.reshape(a_new.shape[0], -1)[:k] = vh.to(a_new.dtype)
    b_new.reshape(b_new.shape[0], -1)[:, :k] = u.to(b_new.dtype)
