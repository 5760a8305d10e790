"""AdaLoRA rank allocation: the cubic budget schedule and the importance-driven ``RankAllocator``.

The allocator scores every (A row, E entry, B column) triplet of the adapter's SVD layers by its
sensitivity |p·∇p| (EMA-smoothed) times its uncertainty, and zeroes the singular values E_i with the
lowest scores until the total rank fits the budget that ``budget_schedule`` gives for the step.
Everything stays on the device; the rank pattern is read back to the host only on request.

``adalora`` re-exports both names, so ``deltatune.methods.adalora`` remains the public import path.
The config is read by attribute (``beta1``, ``beta2``, ``target_r``), so this module needs no import of it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._adalora_layer import SVDLayer

__all__ = ["RankAllocator", "allocator_state", "budget_schedule", "restore_allocator_state"]


def budget_schedule(
    step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int, delta_t: int
) -> tuple[int, bool]:
    """AdaLoRA's cubic budget schedule: (budget, whether to mask at this step).

    t ≤ tinit: (init_bgt, False); t > T − tfinal: (target_bgt, True); otherwise
    budget = int((init_bgt − target_bgt)·(1 − (t − tinit)/(T − tfinal − tinit))³ + target_bgt), masking
    when t % deltaT == 0.
    """
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    progress = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * progress**3 + target_bgt)
    return budget, step % delta_t == 0


# ---- rank allocation ----------------------------------------------------------------------------
class RankAllocator:
    """Importance-driven pruning of AdaLoRA's singular values, kept on the device.

    Args:
        layers: ``(module name, layer)`` for every SVD layer holding the adapter.
        config: The adapter's config (betas, budget knobs).
        adapter_name: Which adapter to allocate.
    """

    def __init__(self, layers: list[tuple[str, SVDLayer]], config: Any, adapter_name: str) -> None:
        self.layers = layers
        self.config = config
        self.adapter_name = adapter_name
        self.init_bgt = sum(layer.r[adapter_name] for _, layer in layers)
        self.target_bgt = config.target_r * len(layers)
        self.masks: list[torch.Tensor] | None = None  # device bool masks over r, per layer (True = keep)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Clears the sensitivity and uncertainty EMAs."""
        self.ipt: list[torch.Tensor] | None = None
        self.unc: list[torch.Tensor] | None = None

    def _params(self) -> list[nn.Parameter]:
        n = self.adapter_name
        return [p for _, layer in self.layers for p in (layer.lora_A[n], layer.lora_E[n], layer.lora_B[n])]

    @torch.no_grad()
    def update_ipt(self) -> bool:
        """One EMA step of sensitivity Ī and uncertainty Ū from the current gradients (fused foreach
        ops over all tensors). Returns False when gradients are missing."""
        params = self._params()
        grads = [p.grad for p in params if p.grad is not None]
        if len(grads) != len(params):
            return False
        importance = torch._foreach_mul([p.detach() for p in params], grads)
        torch._foreach_abs_(importance)
        if self.ipt is None or self.unc is None:
            self.ipt = [torch.zeros_like(t) for t in importance]
            self.unc = [torch.zeros_like(t) for t in importance]
        torch._foreach_lerp_(self.ipt, importance, 1 - self.config.beta1)
        deviation = torch._foreach_sub(importance, self.ipt)
        torch._foreach_abs_(deviation)
        torch._foreach_lerp_(self.unc, deviation, 1 - self.config.beta2)
        return True

    @torch.no_grad()
    def triplet_scores(self) -> list[torch.Tensor]:
        """S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki), with s = Ī ⊙ Ū; one (r,) tensor per layer."""
        if self.ipt is None or self.unc is None:
            raise RuntimeError("no importance scores yet: call update_ipt() after a backward pass first")
        scores = torch._foreach_mul(self.ipt, self.unc)
        out = []
        for i in range(len(self.layers)):
            s_a, s_e, s_b = scores[3 * i], scores[3 * i + 1], scores[3 * i + 2]
            out.append(s_e.view(-1) + s_a.mean(dim=1) + s_b.mean(dim=0))
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> list[torch.Tensor]:
        """Zeroes every E_i whose score is within the lowest ``init_bgt − budget``; returns keep masks."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        if k <= 0:
            masks = [torch.ones_like(s, dtype=torch.bool) for s in scores]
        else:
            threshold = torch.kthvalue(torch.cat(scores), k).values
            masks = [s > threshold for s in scores]
        self.apply_masks(masks)
        self.masks = masks
        return masks

    @torch.no_grad()
    def apply_masks(self, masks: list[torch.Tensor]) -> None:
        """E_i ← 0 where the mask is False."""
        n = self.adapter_name
        for (_, layer), keep in zip(self.layers, masks, strict=True):
            layer.lora_E[n].mul_(keep.view(-1, 1).to(layer.lora_E[n].dtype))

    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """``{"<module>.lora_E": [keep, ...]}`` from the current masks (one host read)."""
        if self.masks is None:
            return None
        flat = torch.cat(self.masks).cpu().tolist()
        out: dict[str, list[bool]] = {}
        offset = 0
        for (name, _), mask in zip(self.layers, self.masks, strict=True):
            out[f"{name}.lora_E"] = [bool(v) for v in flat[offset : offset + mask.numel()]]
            offset += mask.numel()
        return out


# ---- resumable state ------------------------------------------------------------------------------
def allocator_state(trainable: dict[str, nn.Parameter], allocator: RankAllocator) -> dict[str, torch.Tensor]:
    """What exact resumption needs beyond the pruned PEFT file: ``param:<name>`` for every trainable tensor
    (unpruned), ``ipt:<i>``/``unc:<i>`` for the importance EMAs (one per factor, in allocator order) and
    ``mask:<i>`` (uint8, one per layer)."""
    tensors = {f"param:{name}": p.detach().contiguous().cpu() for name, p in trainable.items()}
    for kind in ("ipt", "unc"):
        for i, t in enumerate(getattr(allocator, kind) or []):
            tensors[f"{kind}:{i}"] = t.detach().contiguous().cpu()
    for i, mask in enumerate(allocator.masks or []):
        tensors[f"mask:{i}"] = mask.to(torch.uint8).cpu()
    return tensors


def restore_allocator_state(
    params: dict[str, nn.Parameter], allocator: RankAllocator, tensors: dict[str, torch.Tensor]
) -> None:
    """Copies :func:`allocator_state`'s tensors back into ``params`` (all of the model's, by the same names)
    and the allocator.

    Raises:
        ValueError: when the saved tensors do not match the trainable ones by name or shape.
    """
    expected = {name for name, p in params.items() if p.requires_grad}
    saved = {k[len("param:") :] for k in tensors if k.startswith("param:")}
    if saved != expected:
        missing, extra = sorted(expected - saved)[:3], sorted(saved - expected)[:3]
        raise ValueError(
            f"the checkpoint holds AdaLoRA state for a different adapter layout (missing {missing}, "
            f"unexpected {extra}); resume with the same model and adapter config"
        )
    with torch.no_grad():
        for name in saved:
            target, value = params[name], tensors[f"param:{name}"]
            if target.shape != value.shape:
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(value.shape)} but the model has {tuple(target.shape)}; "
                    "resume with the same adapter config (init_r)"
                )
            target.copy_(value.to(dtype=target.dtype, device=target.device))
    device = next(iter(params.values())).device

    def series(kind: str) -> list[torch.Tensor] | None:
        items = sorted((int(k.split(":")[1]), v) for k, v in tensors.items() if k.startswith(f"{kind}:"))
        return [v.to(device) for _, v in items] or None

    allocator.ipt, allocator.unc = series("ipt"), series("unc")
    masks = series("mask")
    allocator.masks = [m.bool() for m in masks] if masks else None
