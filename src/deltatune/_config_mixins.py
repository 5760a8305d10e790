"""Config mixins for the fields only some methods have (mixed into :class:`deltatune.config.TargetingConfig`
subclasses), and :func:`help_field`, how every config field carries its help text."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._config_types import check_positive_int, check_range, pattern_value

__all__ = ["LayerSelectionMixin", "LowRankMixin", "help_field"]


def help_field(
    help: str, default: Any = dataclasses.MISSING, *, metadata: dict[str, Any] | None = None, **kwargs: Any
) -> Any:
    """A dataclass ``field`` whose ``metadata["help"]`` is ``help`` (one or more complete sentences): the one
    place a config field is described (the CLI's ``--<field>`` help reads it); ``metadata`` adds other entries
    (LoRA's variant tags, :mod:`deltatune.methods._lora_variants`)."""
    return field(default=default, metadata={"help": help, **(metadata or {})}, **kwargs)


@dataclass
class LayerSelectionMixin:
    """``layers_to_transform`` and ``layers_pattern``: limit a method to some layers of the model (LoRA and the
    other low-rank methods have them; IA³ does not)."""

    layers_to_transform: list[int] | int | None = help_field(
        "Indices of the layers to adapt (one or several); applies when target_modules is a list.", None
    )
    layers_pattern: list[str] | str | None = help_field(
        "Name of the layer container whose index layers_to_transform refers to, for example 'layers'.", None
    )

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()
        regex_targets = isinstance(getattr(self, "target_modules", None), str)
        if self.layers_to_transform is not None:
            if regex_targets:
                raise ValueError(
                    "`layers_to_transform` cannot be used when `target_modules` is a str. A regex string selects "
                    "the modules by itself (it may name the layer index); give target_modules as a list."
                )
            layers = (
                [self.layers_to_transform]
                if isinstance(self.layers_to_transform, int)
                else self.layers_to_transform
            )
            if not isinstance(layers, list | tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise ValueError(
                    f"layers_to_transform must be an int or a list of ints, got {self.layers_to_transform!r}"
                )
        # PEFT's checks and the first sentence of its messages; an empty layers_pattern ("" or []) is no pattern
        if self.layers_pattern and regex_targets:
            raise ValueError(
                "`layers_pattern` cannot be used when `target_modules` is a str. It only narrows "
                "layers_to_transform, which needs target_modules as a list."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                "layers_pattern only says which numbered container layers_to_transform indexes."
            )


@dataclass
class LowRankMixin:
    """The fields of the low-rank methods: a rank and a scale numerator, each overridable per module.

    Mixed into a :class:`TargetingConfig` subclass (see :class:`AdapterConfig`); the method names its alpha
    field in ``ALPHA_FIELD``.
    """

    r: int = help_field("Rank of the decomposition, a positive integer.", 8)
    rank_pattern: dict[str, Any] | None = help_field(
        "Per-module rank overrides as a JSON object of module regex to rank.", default_factory=dict
    )
    alpha_pattern: dict[str, float] = help_field(
        "Per-module alpha overrides as a JSON object of module regex to alpha.", default_factory=dict
    )

    ALPHA_FIELD: ClassVar[str | None] = "alpha"
    #: Whether ``rank_pattern`` maps modules to ranks (validated as positive ints); a method whose pattern
    #: holds something else (AdaLoRA's keep masks) sets False and validates it itself.
    RANK_PATTERN_IS_RANKS: ClassVar[bool] = True
    RECIPE_DEFAULTS: ClassVar[dict[str, Any]] = {"r": 16}

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()
        check_positive_int("r", self.r)
        check_range(str(self.ALPHA_FIELD), self.alpha_value, 0)
        for pname in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, pname)
            if pattern is not None and not isinstance(pattern, dict):
                raise ValueError(f"{pname} must be a dict of {{module regex: value}}, got {pattern!r}")
        for key, value in (self.alpha_pattern or {}).items():
            check_range(f"alpha_pattern[{key!r}]", value, 0)
        if isinstance(self.rank_pattern, dict) and self.RANK_PATTERN_IS_RANKS:
            for key, value in self.rank_pattern.items():
                check_positive_int(f"rank_pattern[{key!r}]", value)

    def rank_and_alpha(self, module_names: list[str]) -> tuple[int, float]:
        """Rank and alpha for a module (any of its ``module_names`` spellings), after the patterns."""
        r = pattern_value(self.rank_pattern, module_names)
        alpha = pattern_value(self.alpha_pattern, module_names)
        return (self.r if r is None else int(r)), (self.alpha_value if alpha is None else float(alpha))

    def module_options(self, module_names: list[str]) -> dict[str, Any]:
        """The options of the classes after this one in the MRO (the config's other per-module options), plus
        ``"r"`` and ``"alpha"`` for the module, after ``rank_pattern`` and ``alpha_pattern``."""
        r, alpha = self.rank_and_alpha(module_names)
        others: dict[str, Any] = getattr(super(), "module_options", lambda _names: {})(module_names)
        return {**others, "r": r, "alpha": alpha}

    def allocated_ranks(self) -> dict[str, int]:
        """``r`` and the ``rank_pattern`` ranks, by field name (loading checks them against the file's shapes)."""
        ranks = {"r": int(self.r)}
        if self.RANK_PATTERN_IS_RANKS and isinstance(self.rank_pattern, dict):
            ranks.update({f"rank_pattern[{k!r}]": int(v) for k, v in self.rank_pattern.items()})
        return ranks

    @property
    def alpha_value(self) -> float:
        """The scale numerator (``lora_alpha`` for LoRA/AdaLoRA, ``alpha`` for LoHa/LoKr)."""
        return float(getattr(self, str(self.ALPHA_FIELD)))
