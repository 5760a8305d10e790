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

The config and the registration live here (no torch); the tuner, the layer and the allocator in
:mod:`._adalora_model`, :mod:`._adalora_layer` and :mod:`._adalora_allocator`, imported on first use.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import check_positive_int, check_range, help_field
from ..registry import MethodSpec, register_method
from ._lazy import forward_attributes
from ._target_defaults import ADALORA_DEFAULT_TARGETS
from .lora import LoraConfig

__all__ = ["AdaLoraConfig"]

#: What ``deltatune train`` uses when the user sets none of these: warm up 10% of the run, prune, fix the
#: budget for the last 30%, reallocating about 50 times.
SCHEDULE_FIELDS = ("tinit", "tfinal", "deltaT", "total_step")


@dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of AdaLoRA (PEFT's ``AdaLoraConfig`` fields, defaults and JSON keys; each field's
    description is its ``help`` metadata). ``r`` is not used (``init_r`` and ``target_r`` are); ``use_rslora``
    is ignored; the scale is lora_alpha / init_r (not divided by the final rank)."""

    #: PiSSA, OLoRA and orthogonal initialisation are LoRA's (PEFT's AdaLoRA silently ignores them).
    BASE_INITS: ClassVar[tuple[str, ...]] = ()

    target_r: int = help_field("Average rank per module at the end of training.", 8)
    init_r: int = help_field("Rank every module starts with.", 12)
    tinit: int = help_field("Steps of warm-up before any pruning.", 0)
    tfinal: int = help_field("Steps at the end of training with the final budget fixed.", 0)
    deltaT: int = help_field("Number of steps between two budget allocations while pruning.", 1)
    beta1: float = help_field("EMA factor of the sensitivity, at least 0 and below 1.", 0.85)
    beta2: float = help_field("EMA factor of the uncertainty, at least 0 and below 1.", 0.85)
    orth_reg_weight: float = help_field(
        "Weight of the orthogonality regulariser added to the training loss.", 0.5
    )
    total_step: int | None = help_field(
        "Total training steps; when unset, the deltatune Trainer fills it from its planned steps.", None
    )
    rank_pattern: dict[str, Any] | None = help_field(
        "After training, the kept singular values of each module; unset before any pruning.", None
    )

    #: Not hot-swappable (as in PEFT), though its config derives from LoRA's.
    HOTSWAP_FIELDS: ClassVar[tuple[str, ...] | None] = None
    PEFT_TYPE: ClassVar[str] = "ADALORA"
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = ADALORA_DEFAULT_TARGETS
    RANK_PATTERN_IS_RANKS: ClassVar[bool] = False
    VARIANT_FLAGS: ClassVar[tuple[str, ...]] = ()
    #: The CLI recipe trains without the orthogonal regulariser: on the offline digits it cost 1.5 points of
    #: accuracy over three seeds (.9536 with PEFT's 0.5, .9690 without; README, "Which LoRA initialiser"), and
    #: the PEFT guide's AdaLoRA (no task_type) trains without it too. The library keeps PEFT's 0.5.
    RECIPE_DEFAULTS: ClassVar[dict[str, Any]] = {"init_r": 12, "target_r": 8, "orth_reg_weight": 0.0}
    #: LoRA's fields that AdaLoRA ignores, with why: the CLI refuses them for AdaLoRA.
    INERT_FIELDS: ClassVar[dict[str, str]] = {
        "use_rslora": "AdaLoRA scales by lora_alpha over its rank, without rsLoRA's square root (PEFT ignores it too)"
    }
    FLAG_ALIASES: ClassVar[dict[str, tuple[str, str]]] = {
        "r": ("target_r", "AdaLoRA: --r sets target_r, the average rank after pruning (init_r starts higher)")
    }

    def __post_init__(self) -> None:
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA: use_dora=True needs LoraConfig")
        if self.loftq_config and self.init_lora_weights == "loftq":
            raise ValueError("ADALORA does not support LOFTQ: init_lora_weights='loftq' needs LoraConfig")
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
        if isinstance(self.orth_reg_weight, int | float) and self.orth_reg_weight < 0:
            raise ValueError(
                "`orth_reg_weight` should be greater than or equal to 0, but the value passed is "
                f"{self.orth_reg_weight}"
            )
        check_range("orth_reg_weight", self.orth_reg_weight, 0)
        if self.r != 8:
            warnings.warn(
                f"Note that `r` is not used in AdaLora and will be ignored: AdaLoRA ignores r={self.r}; modules "
                f"start at init_r={self.init_r} and are pruned to target_r={self.target_r} on average.",
                stacklevel=3,
            )
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int) -> None:
        """Raises ``ValueError`` unless tinit < total_step − tfinal (the pruning phase is non-empty)."""
        if isinstance(total_step, int) and not isinstance(total_step, bool) and total_step <= 0:
            raise ValueError(
                "AdaLoRA does not work when `total_step` is None, supply a value > 0: "
                f"total_step={total_step} must be a positive integer"
            )
        check_positive_int("total_step", total_step)
        if self.tinit >= total_step - self.tfinal:
            raise ValueError(
                "The supplied schedule values don't allow for a budgeting phase. AdaLoRA schedule does not fit: "
                f"tinit={self.tinit} must be < total_step - tfinal = {total_step} - {self.tfinal} = "
                f"{total_step - self.tfinal}; lower tinit or tfinal, or train for more steps"
            )

    @classmethod
    def recipe_defaults(cls, planned_steps: int, given: dict[str, Any]) -> dict[str, Any]:
        """The guide's ranks, plus a schedule fitted to the run unless the user set one of
        tinit/tfinal/deltaT/total_step: warm up 10%, prune, fix the budget for the last 30%, about 50
        reallocations."""
        defaults = dict(cls.RECIPE_DEFAULTS)
        if not set(SCHEDULE_FIELDS) & set(given):
            defaults.update(
                tinit=int(0.1 * planned_steps),
                tfinal=int(0.3 * planned_steps),
                deltaT=max(1, planned_steps // 50),
            )
        return defaults

    def allocated_ranks(self) -> dict[str, int]:  # every module starts at init_r (r is unused)
        return {"init_r": int(self.init_r)}

    def check_fits_run(self, planned_steps: int) -> None:
        """The schedule must fit ``total_step`` (or the run's planned steps when unset)."""
        self.check_schedule(self.total_step or planned_steps)

    def rank_and_alpha(self, module_names: list[str]) -> tuple[int, float]:
        """Every module starts at ``init_r``; ``alpha_pattern`` may still set alpha per module."""
        _, alpha = super().rank_and_alpha(module_names)
        return self.init_r, alpha


register_method(
    MethodSpec(
        name="adalora",
        config_cls=AdaLoraConfig,
        layer="deltatune.methods._adalora_layer:SVDLayer",
        prefix="lora_",
        tuner="deltatune.methods._adalora_model:AdaLoraModel",
        display_name="AdaLoRA",
        extends="lora",
        listing_order=40,
    )
)

__getattr__ = forward_attributes(
    __name__, "._adalora_model", "._adalora_layer", "._adalora_allocator", "._adalora_patterns"
)
