"""AdaLoRA: adaptive budget allocation (Zhang et al., ICLR 2023, "AdaLoRA: Adaptive Budget Allocation
for Parameter-Efficient Fine-Tuning").

    y = W x + (alpha / (ranknum + 1e-5)) · B (E ⊙ A) dropout(x),   A ∈ R^{r×in}, E ∈ R^{r×1}, B ∈ R^{out×r}

The delta is an SVD-like triplet per rank. During training an importance score per triplet
(sensitivity |p·∇p| smoothed by EMAs, times its uncertainty) decides which singular values E_i are
zeroed, following a cubic budget schedule from ``init_r`` down to ``target_r`` per module on average.
An orthogonality regulariser ‖AAᵀ − I‖_F + ‖BᵀB − I‖_F keeps A and B near-orthogonal.

The allocation keeps everything on the device (no ``.item()``/``.tolist()`` per step): the
threshold, the masks and the EMAs are tensors; the rank pattern is read back to the host only when
the budget becomes final or the adapter is saved.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, check_positive_int, check_range
from ..inject import AdapterModel
from ..layers import AdapterLayer, expect_config
from ..registry import MethodSpec, register_method
from ._adalora_allocator import RankAllocator, budget_schedule
from ._adalora_patterns import expand_pruned_tensors, masks_by_module
from ._fused import is_plain, low_rank_add, low_rank_linear, low_rank_merge_pays
from .lora import LoraConfig

logger = logging.getLogger(__name__)

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "RankAllocator",
    "SVDLayer",
    "adalora_delta_weight",
    "budget_schedule",
    "orthogonal_regularizer",
]


@dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of AdaLoRA (PEFT's ``AdaLoraConfig`` fields, defaults and JSON keys).

    Attributes:
        target_r: Average rank per module at the end of training (default 8).
        init_r: Rank every module starts with (default 12).
        tinit: Steps of warm-up before any pruning (default 0).
        tfinal: Steps at the end with the final budget fixed (default 0).
        deltaT: Prune every ``deltaT`` steps in between (default 1).
        beta1: EMA factor of the sensitivity (default 0.85).
        beta2: EMA factor of the uncertainty (default 0.85).
        orth_reg_weight: Weight of the orthogonality regulariser added to the training loss (default 0.5).
        total_step: Total training steps. May be left None here; the deltatune Trainer fills it from its
            planned steps, and ``update_and_allocate`` refuses to run without it.
        rank_pattern: After training, ``{"<module>.lora_E": [keep, ...]}``; None before any pruning.
        lora_alpha: Scale numerator; the scale is lora_alpha / init_r (not divided by the final rank).

    ``r`` is not used (``init_r`` and ``target_r`` are); ``use_rslora`` is ignored.
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, Any] | None = None

    PEFT_TYPE: ClassVar[str] = "ADALORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("init_r", self.init_r)
        check_positive_int("target_r", self.target_r)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} must not exceed init_r={self.init_r}")
        check_positive_int("tinit", self.tinit, allow_zero=True)
        check_positive_int("tfinal", self.tfinal, allow_zero=True)
        check_positive_int("deltaT", self.deltaT)
        check_range("beta1", self.beta1, 0, 1)
        check_range("beta2", self.beta2, 0, 1)
        check_range("orth_reg_weight", self.orth_reg_weight, 0)
        if self.r != 8:
            warnings.warn(
                f"AdaLoRA ignores r={self.r}: modules start at init_r={self.init_r} and are pruned to target_r="
                f"{self.target_r} on average",
                stacklevel=3,
            )
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int) -> None:
        """Raises ``ValueError`` unless tinit < total_step − tfinal (the pruning phase is non-empty)."""
        check_positive_int("total_step", total_step)
        if self.tinit >= total_step - self.tfinal:
            raise ValueError(
                f"AdaLoRA schedule does not fit: tinit={self.tinit} must be < total_step - tfinal = "
                f"{total_step} - {self.tfinal} = {total_step - self.tfinal}; lower tinit or tfinal, or train for "
                "more steps"
            )

    def rank_and_alpha(self, module_names: list[str]) -> tuple[int, float]:
        """Every module starts at ``init_r``; ``alpha_pattern`` may still set alpha per module."""
        _, alpha = super().rank_and_alpha(module_names)
        return self.init_r, alpha


# ---- pure maths ---------------------------------------------------------------------------------
def adalora_scaling(lora_alpha: float, r: int) -> float:
    """PEFT's numerator: lora_alpha if > 0 else r (divided by ranknum + 1e-5 at use)."""
    return lora_alpha if lora_alpha > 0 else r


def adalora_delta_weight(
    lora_a: torch.Tensor,
    lora_e: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    ranknum: torch.Tensor | float,
) -> torch.Tensor:
    """ΔW = B (A ⊙ E) · scaling / (ranknum + 1e-5); A (r, in), E (r, 1), B (out, r) → (out, in)."""
    return (lora_b @ (lora_a * lora_e)) * (scaling / (ranknum + 1e-5))


def orthogonal_regularizer(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over all A and B of ‖P − I‖_F with P = A Aᵀ for A (r, in) and P = Bᵀ B for B (out, r).

    Factors of the same shape are batched into one ``bmm``.
    """
    groups: dict[tuple[str | int, ...], list[torch.Tensor]] = {}
    for a, b in factors:
        groups.setdefault(("A", *a.shape), []).append(a)
        groups.setdefault(("B", *b.shape), []).append(b.t())
    total: torch.Tensor | None = None
    count = 0
    for _key, mats in groups.items():
        stack = torch.stack(mats)  # (L, r, n)
        gram = torch.bmm(stack, stack.transpose(1, 2))
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        norms = torch.linalg.matrix_norm(gram - eye, ord="fro").sum()
        total = norms if total is None else total + norms
        count += len(mats)
    if total is None:
        raise ValueError("orthogonal_regularizer needs at least one (A, B) pair")
    return total / count


# ---- layer --------------------------------------------------------------------------------------
class SVDLayer(AdapterLayer):
    """Wraps a Linear or Conv2d with AdaLoRA triplets (``lora_A``, ``lora_E``, ``lora_B``)."""

    adapter_param_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_E", "lora_B")
    other_param_names: ClassVar[tuple[str, ...]] = ("ranknum",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()

    def _fan_in(self) -> int:
        return int(self.base_weight[0].numel())

    def update_layer(self, adapter_name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        config = expect_config(config, AdaLoraConfig)
        kw = self._new_dtype_device()
        out_dim = self.base_weight.shape[0]
        self.lora_A[adapter_name] = nn.Parameter(torch.empty(r, self._fan_in(), **kw))
        self.lora_E[adapter_name] = nn.Parameter(torch.empty(r, 1, **kw))
        self.lora_B[adapter_name] = nn.Parameter(torch.empty(out_dim, r, **kw))
        self.ranknum[adapter_name] = nn.Parameter(torch.full((1,), float(r), **kw), requires_grad=False)
        self.lora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.r[adapter_name] = r
        self.scaling[adapter_name] = adalora_scaling(alpha, r)
        with torch.no_grad():
            if config.init_lora_weights is False:
                for p in (self.lora_A, self.lora_E, self.lora_B):
                    nn.init.normal_(p[adapter_name])
            else:
                nn.init.zeros_(self.lora_E[adapter_name])
                nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)
        self._finish_update(adapter_name)

    def resize(self, adapter_name: str, rank: int) -> None:
        """Rebuilds the triplets at ``rank`` (for loading a pruned adapter); ``ranknum`` keeps init_r."""
        for name in self.adapter_param_names:
            container = getattr(self, name)
            old = container[adapter_name]
            shape = list(old.shape)
            shape[1 if name == "lora_B" else 0] = rank
            container[adapter_name] = nn.Parameter(
                torch.zeros(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
            )
        self.r[adapter_name] = rank

    def _ranknum(self, adapter_name: str) -> torch.Tensor:
        return self.ranknum[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = adalora_delta_weight(
            self.lora_A[adapter_name],
            self.lora_E[adapter_name],
            self.lora_B[adapter_name],
            self.scaling[adapter_name],
            self._ranknum(adapter_name),
        )
        return delta.reshape(self.base_weight.shape)

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        x = self.lora_dropout[adapter_name](x)
        a = self.lora_A[adapter_name]
        if not isinstance(self.base_layer, nn.Linear):
            return self.base_forward_with_weight(x.to(a.dtype), self.delta_weight(adapter_name))
        scale = self.scaling[adapter_name] / (self._ranknum(adapter_name) + 1e-5)
        hidden = F.linear(x.to(a.dtype), a * self.lora_E[adapter_name])
        return F.linear(hidden, self.lora_B[adapter_name]) * scale

    def _low_rank_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A ⊙ E · scale, B, dropout p): the scale and E fold into A (an r×in product), so the term is a
        plain low-rank GEMM pair."""
        drop = self.lora_dropout[adapter_name]
        p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
        scale = self.scaling[adapter_name] / (self._ranknum(adapter_name) + 1e-5)
        return self.lora_A[adapter_name] * (self.lora_E[adapter_name] * scale), self.lora_B[adapter_name], p

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        # The base GEMM and the low-rank term in one autograd node (see _fused.LowRankLinear).
        if not isinstance(self.base_layer, nn.Linear):
            return None
        a, b, p = self._low_rank_factors(adapter_name)
        needs_grad = torch.is_grad_enabled() and a.requires_grad
        plain = is_plain(self.base_layer, (nn.Linear,))
        if plain and p == 0 and low_rank_merge_pays(x, self.base_weight, a.shape[0], needs_grad):
            # Inference over many tokens: one GEMM with W + B (A ⊙ E) s (what merging computes), one addmm.
            weight = self.base_weight
            merged = torch.addmm(weight, b.to(weight.dtype), a.to(weight.dtype))
            return self.base_forward_with_weight(x, merged, self.base_bias)
        return low_rank_linear(self.base_layer, x, a, b, 1.0, p)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if not isinstance(self.base_layer, nn.Linear):
            return super().add_adapter_output(result, x, adapter_name)
        a, b, p = self._low_rank_factors(adapter_name)
        return low_rank_add(result, x, a, b, 1.0, p)

    def export_tensors(self, adapter_name: str, keep: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The saved tensors, sliced to the kept triplets when ``keep`` (a bool mask over r) is given."""
        a, e, b = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        # A module loaded from a pruned adapter is already resized to the kept triplets: nothing to slice.
        if keep is not None and keep.numel() == a.shape[0]:
            a, e, b = a[keep], e[keep], b[:, keep]
        elif keep is not None and int(keep.sum()) != a.shape[0]:
            raise ValueError(
                f"rank_pattern keeps {int(keep.sum())} of {keep.numel()} triplets but the module holds "
                f"{a.shape[0]}; the rank_pattern does not belong to this adapter"
            )
        return {"lora_A": a.detach(), "lora_E": e.detach(), "lora_B": b.detach()}


class AdaLoraModel(AdapterModel):
    """The tuner for AdaLoRA: adds the orthogonal regulariser to a training loss and owns the allocator.

    ``update_and_allocate(global_step)`` must run after each backward and before ``zero_grad``; the
    deltatune Trainer integration calls it from ``on_optimizer_step``.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__(model, config, adapter_name)
        self._allocator: RankAllocator | None = None
        self._apply_loaded_rank_pattern(adapter_name)

    def inject_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        trainable = [n for n, c in self.peft_config.items() if not c.inference_mode]
        if trainable and not config.inference_mode:
            raise ValueError(
                f"AdaLoRA supports one trainable adapter per model; {trainable[0]!r} is already trainable. "
                "Load additional adapters with is_trainable=False"
            )
        super().inject_adapter(adapter_name, config)

    def _apply_loaded_rank_pattern(self, adapter_name: str) -> None:
        config = expect_config(self.peft_config[adapter_name], AdaLoraConfig)
        if config.rank_pattern:
            self.resize_by_rank_pattern(config.rank_pattern, adapter_name)

    def resize_by_rank_pattern(self, rank_pattern: dict[str, list[bool]], adapter_name: str) -> None:
        """Shrinks each module to the number of kept triplets in ``rank_pattern`` (before loading)."""
        by_name = masks_by_module(rank_pattern, self.aliases.modern)
        for name, layer in self.adapter_layers():
            if not isinstance(layer, SVDLayer) or adapter_name not in layer.r:
                continue
            keep: list[bool] | None = next(
                (by_name[v] for v in self.name_variants(name) if v in by_name), None
            )
            if keep is not None:
                layer.resize(adapter_name, int(sum(bool(k) for k in keep)))

    def expand_pruned(
        self, tensors: dict[str, torch.Tensor], rank_pattern: dict[str, list[bool]], adapter_name: str
    ) -> dict[str, torch.Tensor]:
        """Saved tensors of a pruned adapter, scattered back to the modules of ``adapter_name`` that still
        hold all ``init_r`` triplets (pruned ones zero): a checkpoint then resumes into the adapter being
        trained. The rank pattern is adopted, so later saves slice and post-``tfinal`` steps re-mask."""
        ranks = {name: layer.r[adapter_name] for name, layer in self.svd_layers(adapter_name)}
        masks = masks_by_module(rank_pattern, self.aliases.modern)
        out, expanded = expand_pruned_tensors(
            tensors, masks, ranks, lambda module: dict.fromkeys([module, self.aliases.modern(module)])
        )
        if expanded:
            expect_config(self.peft_config[adapter_name], AdaLoraConfig).rank_pattern = dict(rank_pattern)
            if self._allocator is not None and self._allocator.adapter_name == adapter_name:
                self._allocator = None
        return out

    def _masks_from_rank_pattern(
        self, allocator: RankAllocator, rank_pattern: dict[str, list[bool]]
    ) -> list[torch.Tensor] | None:
        """Keep masks for the allocator's layers from a stored rank pattern (None if it does not fit)."""
        by_name = masks_by_module(rank_pattern, self.aliases.modern)
        masks: list[torch.Tensor] = []
        for name, layer in allocator.layers:
            keep = next((by_name[v] for v in self.name_variants(name) if v in by_name), None)
            if keep is None or len(keep) != layer.r[allocator.adapter_name]:
                return None
            device = layer.lora_E[allocator.adapter_name].device
            masks.append(torch.tensor(keep, dtype=torch.bool, device=device))
        return masks

    def svd_layers(self, adapter_name: str | None = None) -> list[tuple[str, SVDLayer]]:
        name = adapter_name or self.active_adapter
        return [
            (n, layer)
            for n, layer in self.adapter_layers()
            if isinstance(layer, SVDLayer) and name in layer.r
        ]

    @property
    def rank_allocator(self) -> RankAllocator:
        """The allocator of the active adapter (created on first use)."""
        config = expect_config(self.peft_config[self.active_adapter], AdaLoraConfig)
        if self._allocator is None or self._allocator.adapter_name != self.active_adapter:
            self._allocator = RankAllocator(self.svd_layers(), config, self.active_adapter)
        return self._allocator

    def orthogonal_loss(self) -> torch.Tensor:
        """The orthogonal regulariser over the active adapter's factors."""
        n = self.active_adapter
        return orthogonal_regularizer([(layer.lora_A[n], layer.lora_B[n]) for _, layer in self.svd_layers()])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.model(*args, **kwargs)
        config = expect_config(self.peft_config[self.active_adapter], AdaLoraConfig)
        loss = getattr(outputs, "loss", None)
        if (
            self.training
            and isinstance(loss, torch.Tensor)
            and config.orth_reg_weight > 0
            and not config.inference_mode
        ):
            outputs.loss = loss + config.orth_reg_weight * self.orthogonal_loss()
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """Updates importances and prunes singular values per the budget schedule.

        Call after ``loss.backward()`` and before ``optimizer.zero_grad()``.

        Raises:
            ValueError: if ``total_step`` is not set on the config.
        """
        config = expect_config(self.peft_config[self.active_adapter], AdaLoraConfig)
        if config.total_step is None:
            raise ValueError(
                "AdaLoraConfig.total_step is not set; set it to the number of optimiser steps, or train with "
                "deltatune's Trainer integration, which fills it from the planned steps"
            )
        allocator = self.rank_allocator
        total = config.total_step
        final_step = total - config.tfinal
        if global_step < final_step:
            if allocator.update_ipt():
                budget, mask = budget_schedule(
                    global_step,
                    allocator.init_bgt,
                    allocator.target_bgt,
                    config.tinit,
                    config.tfinal,
                    total,
                    config.deltaT,
                )
                if mask:
                    allocator.mask_to_budget(budget)
        elif global_step == final_step:
            if allocator.ipt is None:
                allocator.update_ipt()
            if allocator.ipt is not None:
                allocator.mask_to_budget(allocator.target_bgt)
                config.rank_pattern = allocator.rank_pattern()
                allocator.reset_ipt()
        else:
            if allocator.masks is None and config.rank_pattern:  # e.g. resumed after tfinal
                allocator.masks = self._masks_from_rank_pattern(allocator, config.rank_pattern)
            if allocator.masks is not None:
                allocator.apply_masks(allocator.masks)

    def current_rank_pattern(self, adapter_name: str | None = None) -> dict[str, list[bool]] | None:
        """The rank pattern to save: the final one, or the latest masks during training."""
        name = adapter_name or self.active_adapter
        config = expect_config(self.peft_config[name], AdaLoraConfig)
        if (
            self._allocator is not None
            and self._allocator.adapter_name == name
            and self._allocator.masks is not None
        ):
            config.rank_pattern = self._allocator.rank_pattern()
        return config.rank_pattern


register_method(
    MethodSpec(
        name="adalora",
        peft_type="ADALORA",
        config_cls=AdaLoraConfig,
        layer_cls=SVDLayer,
        prefix="lora_",
        model_cls=AdaLoraModel,
    )
)
