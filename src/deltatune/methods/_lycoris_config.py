"""The config fields LoHa and LoKr share (no torch: read by the CLI and config loading alone)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import AdapterConfig, check_range, help_field
from ._target_defaults import LORA_DEFAULT_TARGETS

__all__ = ["LycorisConfig"]


@dataclass
class LycorisConfig(AdapterConfig):
    """Fields common to LoHa and LoKr (each field's description is its ``help`` metadata)."""

    r: int = help_field("Rank of the factors, a positive integer.", 8)
    alpha: float = help_field("Scale numerator: the update is scaled by alpha / r.", 8)
    rank_dropout: float = help_field(
        "Probability of dropping an output row of the update in training, at least 0 and below 1.", 0.0
    )
    module_dropout: float = help_field(
        "Probability of skipping the whole adapter in a training step, at least 0 and below 1.", 0.0
    )
    use_effective_conv2d: bool = help_field(
        "Whether to use the CP (Tucker) form for Conv2d kernels larger than 1x1.", False
    )
    init_weights: bool | str = help_field(
        "Initialisation: true starts the adapter as a zero update, false starts it random.", True
    )

    ALPHA_FIELD: ClassVar[str] = "alpha"
    DROPOUT_FIELD: ClassVar[str | None] = "module_dropout"
    RECIPE_DEFAULTS: ClassVar[dict[str, Any]] = {"r": 16, "alpha": 16, "module_dropout": 0.1}
    INIT_CHOICES: ClassVar[tuple[bool | str, ...]] = (True, False)
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = LORA_DEFAULT_TARGETS

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("rank_dropout", self.rank_dropout, 0, 1)
        check_range("module_dropout", self.module_dropout, 0, 1)
        if self.init_weights not in self.INIT_CHOICES:
            raise ValueError(
                f"init_weights={self.init_weights!r} is not valid for {type(self).__name__}; choose one of "
                f"{', '.join(map(repr, self.INIT_CHOICES))}"
            )
