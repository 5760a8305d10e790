"""AdaLoRA's tuner (rank allocation and regulariser in training); formula and paper: :mod:`.adalora`."""

from __future__ import annotations

import logging
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import TargetingConfig
from ..layers import AdapterLayer, expect_config
from ._adalora_allocator import RankAllocator, allocator_state, budget_schedule, restore_allocator_state
from ._adalora_layer import SVDLayer, adalora_delta_weight, adalora_scaling, orthogonal_regularizer
from ._adalora_patterns import expand_pruned_tensors, masks_by_module
from ._lora_model import LoraModel
from .adalora import AdaLoraConfig

logger = logging.getLogger(__name__)

__all__ = [
    "AdaLoraModel",
    "RankAllocator",
    "SVDLayer",
    "adalora_delta_weight",
    "adalora_scaling",
    "budget_schedule",
    "orthogonal_regularizer",
]


class AdaLoraModel(LoraModel):
    """The tuner for AdaLoRA: adds the orthogonal regulariser to a training loss and owns the allocator.

    ``update_and_allocate(global_step)`` must run after each backward and before ``zero_grad``; the
    deltatune Trainer calls it through :meth:`on_optimizer_step`.
    """

    CHECKPOINT_STATE_FILE: ClassVar[str | None] = "adalora_state.safetensors"
    _allocator: RankAllocator | None = None

    # ---- hooks ----------------------------------------------------------------------------------
    def check_new_adapter(self, adapter_name: str, config: TargetingConfig) -> None:
        trainable = [n for n, c in self.peft_config.items() if not c.inference_mode]
        if trainable and not config.inference_mode:
            raise ValueError(
                f"AdaLoraModel supports only 1 trainable adapter: {trainable[0]!r} is already trainable. "
                "Load additional adapters with is_trainable=False (inference_mode=True)"
            )
        super().check_new_adapter(adapter_name, config)

    def after_inject(self, adapter_name: str, config: TargetingConfig) -> None:
        """A config that carries a rank pattern (a saved, pruned adapter) shrinks the modules to it."""
        self._forget_layers()
        pattern = expect_config(config, AdaLoraConfig).rank_pattern
        if pattern:
            self.resize_by_rank_pattern(pattern, adapter_name)

    def extra_loss(self) -> torch.Tensor | None:
        config = self._config()
        if config.orth_reg_weight <= 0 or config.inference_mode:
            return None
        return config.orth_reg_weight * self.orthogonal_loss()

    def prepare_training(self, planned_steps: int) -> None:
        """Fills ``total_step`` from the planned optimiser steps when unset, and checks the schedule."""
        config = self._config()
        if config.total_step is None:
            config.total_step = int(planned_steps)
            logger.info(
                "AdaLoRA: total_step set to the trainer's planned %d optimiser steps", config.total_step
            )
        elif config.total_step != planned_steps:
            logger.warning(
                "AdaLoRA: total_step=%d but the trainer plans %d optimiser steps; the budget schedule follows "
                "total_step",
                config.total_step,
                planned_steps,
            )
        config.check_schedule(config.total_step)
        if planned_steps <= config.tinit:
            msg = "AdaLoRA: this run ends at step %d, before pruning starts (tinit=%d): all init_r=%d ranks are kept"
            logger.warning(msg + " and saved unpruned", planned_steps, config.tinit, config.init_r)
            return
        logger.info(
            "AdaLoRA: ranks %d → %d on average; pruning between steps %d and %d, every %d steps",
            config.init_r,
            config.target_r,
            config.tinit,
            config.total_step - config.tfinal,
            config.deltaT,
        )

    def on_optimizer_step(self, global_step: int) -> None:
        self.update_and_allocate(global_step)

    def rank_summary(self, adapter_name: str | None = None) -> dict[str, int] | None:
        """``{"<module>": kept rank}`` from the current rank pattern (None before any pruning)."""
        pattern = self.current_rank_pattern(adapter_name)
        if not pattern:
            return None
        return {k.removesuffix(".lora_E"): int(sum(bool(v) for v in keep)) for k, keep in pattern.items()}

    def training_summary(self) -> dict[str, Any]:
        ranks = self.rank_summary()
        if not ranks:
            return {}
        config = self._config()
        line = (
            f"AdaLoRA: final ranks sum {sum(ranks.values())} over {len(ranks)} modules "
            f"(min {min(ranks.values())}, max {max(ranks.values())})"
        )
        if self.__dict__.get("_logged_summary") != line:  # the Trainer and the recipe both ask: say it once
            logger.info(line)
            self.__dict__["_logged_summary"] = line
        return {"ranks": ranks, "rank_max": config.init_r}

    def prepare_save(self, adapter_name: str) -> None:
        if expect_config(self.peft_config[adapter_name], AdaLoraConfig).total_step is None:
            warnings.warn(
                "saving an AdaLoRA adapter whose total_step is unset: peft refuses to load such a config; "
                "deltatune's Trainer fills it from the planned steps",
                stacklevel=4,
            )

    def before_export(self, adapter_name: str) -> None:
        self.current_rank_pattern(adapter_name)  # brings config.rank_pattern up to date with the masks

    def export_layer_tensors(
        self, module_name: str, layer: AdapterLayer, adapter_name: str
    ) -> dict[str, Any]:
        """Triplets sliced to the kept ranks of the rank pattern (PEFT's format; rank 0 allowed)."""
        pattern = expect_config(self.peft_config[adapter_name], AdaLoraConfig).rank_pattern
        if not isinstance(layer, SVDLayer):
            return super().export_layer_tensors(module_name, layer, adapter_name)
        keep = None
        if pattern:
            keep = next(
                (pattern[f"{v}.lora_E"] for v in self.name_variants(module_name) if f"{v}.lora_E" in pattern),
                None,
            )
        return layer.export_tensors(adapter_name, torch.tensor(keep, dtype=torch.bool) if keep else None)

    def adapt_loaded_tensors(
        self, tensors: dict[str, torch.Tensor], adapter_name: str, saved_config: TargetingConfig | None
    ) -> dict[str, torch.Tensor]:
        """A pruned file loaded into modules that still hold all ``init_r`` triplets (resuming) is scattered
        back to full rank (see :meth:`expand_pruned`)."""
        pattern = (
            getattr(saved_config, "rank_pattern", None) if isinstance(saved_config, AdaLoraConfig) else None
        )
        return self.expand_pruned(tensors, pattern, adapter_name) if pattern else tensors

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The unpruned trainable tensors and the allocator's EMAs and masks (see :func:`allocator_state`)."""
        trainable = {f"base_model.{n}": p for n, p in self.named_parameters() if p.requires_grad}
        return allocator_state(trainable, self.rank_allocator)

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], saved_config: TargetingConfig) -> None:
        """Restores :meth:`checkpoint_state` (same adapter layout required) and the saved rank pattern."""
        params = {f"base_model.{n}": p for n, p in self.named_parameters()}
        restore_allocator_state(params, self.rank_allocator, tensors)
        self._config().rank_pattern = getattr(saved_config, "rank_pattern", None)

    # ---- AdaLoRA's own API ----------------------------------------------------------------------
    def _config(self, adapter_name: str | None = None) -> AdaLoraConfig:
        return expect_config(self.peft_config[adapter_name or self.current_adapter], AdaLoraConfig)

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
        """The SVD layers holding ``adapter_name`` (default: the active one). Kept between calls (the
        regulariser asks on every forward); injecting, deleting or unloading an adapter refreshes it."""
        name = adapter_name or self.current_adapter
        cache = self.__dict__.setdefault("_svd_layers", {})
        if name not in cache:
            cache[name] = [
                (n, layer)
                for n, layer in self.adapter_layers()
                if isinstance(layer, SVDLayer) and name in layer.r
            ]
        return list(cache[name])

    def _forget_layers(self) -> None:
        self.__dict__.pop("_svd_layers", None)

    def delete_adapter(self, adapter_name: str) -> None:
        self._forget_layers()
        super().delete_adapter(adapter_name)
        self._forget_layers()

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Refused, as in PEFT: the LoRA combinations read ``lora_A``/``lora_B`` and ``config.r``, while an
        AdaLoRA adapter's update is ``B (A * E) alpha / ranknum`` (singular values ``E``, a learned rank)."""
        raise TypeError(
            f"{type(self).__name__} does not support add_weighted_adapter (AdaLoRA's update B·(A⊙E)·α/ranknum "
            "is not a LoRA product); combine LoRA adapters (LoraConfig) instead"
        )

    def unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        self._forget_layers()
        return super().unload_and_optionally_merge(*args, **kwargs)

    @property
    def rank_allocator(self) -> RankAllocator:
        """The allocator of the active adapter (created on first use)."""
        config = expect_config(self.peft_config[self.current_adapter], AdaLoraConfig)
        if self._allocator is None or self._allocator.adapter_name != self.current_adapter:
            self._allocator = RankAllocator(self.svd_layers(), config, self.current_adapter)
        return self._allocator

    def orthogonal_loss(self) -> torch.Tensor:
        """The orthogonal regulariser over the active adapter's factors, in their own precision (fp32) also
        under autocast: it is a handful of r×r Gram matrices, and rounding them to bf16 only adds casts."""
        n = self.current_adapter
        factors = [(layer.lora_A[n], layer.lora_B[n]) for _, layer in self.svd_layers()]
        device = factors[0][0].device.type if factors else "cpu"
        with torch.autocast(device, enabled=False):
            return orthogonal_regularizer(factors)

    def update_and_allocate(self, global_step: int) -> None:
        """Updates importances and prunes singular values per the budget schedule.

        Call after ``loss.backward()`` and before ``optimizer.zero_grad()``.

        Raises:
            ValueError: if ``total_step`` is not set on the config.
        """
        config = expect_config(self.peft_config[self.current_adapter], AdaLoraConfig)
        if config.total_step is None:
            raise ValueError(
                "AdaLoRA does not work when `total_step` is None, supply a value > 0: AdaLoraConfig.total_step is "
                "not set; set it to the number of optimiser steps, or train with "
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
        name = adapter_name or self.current_adapter
        config = expect_config(self.peft_config[name], AdaLoraConfig)
        if (
            self._allocator is not None
            and self._allocator.adapter_name == name
            and self._allocator.masks is not None
        ):
            config.rank_pattern = self._allocator.rank_pattern()
        return config.rank_pattern
