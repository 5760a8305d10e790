"""LoKr: low-rank Kronecker product (Edalati et al., 2022, "KronA"; LyCORIS).

    ΔW = s · W1 ⊗ W2,   W1 ∈ R^{a×c}, W2 ∈ R^{b×d},   out = a·b, in = c·d,   s = alpha / r

W1 may be factored (W1a W1b) with ``decompose_both``; W2 is full when r ≥ max(b, d)/2 and otherwise
W2a W2b (or, for Conv2d with ``use_effective_conv2d``, a CP form with core t2).

Fast path (Linear): with x viewed row-major as a c×d matrix X, (W1 ⊗ W2) x = vec(W1 X W2ᵀ), so the
adapter costs c·d·b + a·c·b MACs per token (c·r·(d+b) + a·c·b with a factored W2) instead of a·b·c·d,
and ΔW is never formed in training.

The config and the registration live here (no torch); the maths and the layer in :mod:`._lokr_layer`,
imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import check_positive_int, help_field
from ..registry import MethodSpec, register_method
from ._lazy import forward_attributes
from ._lycoris_config import LycorisConfig

__all__ = ["LoKrConfig"]


@dataclass
class LoKrConfig(LycorisConfig):
    """Configuration of LoKr (PEFT's ``LoKrConfig`` fields, defaults and JSON keys; each field's description
    is its ``help`` metadata). ``r`` is the rank used when a Kronecker factor is decomposed; ``init_weights``
    may also be ``"lycoris"`` (W2 = 0 instead of W1 = 0)."""

    decompose_both: bool = help_field(
        "Whether to also factor the first Kronecker factor when r is below half its size.", False
    )
    decompose_factor: int = help_field(
        "Preferred size of the first Kronecker factor; -1 makes the factors as square as possible.", -1
    )
    rank_dropout_scale: bool = help_field("Whether to divide the rank-dropout mask by its mean.", False)

    PEFT_TYPE: ClassVar[str] = "LOKR"
    INIT_CHOICES: ClassVar[tuple[bool | str, ...]] = (True, False, "lycoris")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decompose_factor != -1:
            check_positive_int("decompose_factor (or -1)", self.decompose_factor)

    def allocated_ranks(self) -> dict[str, int]:
        """None: a Kronecker factor is factored at rank r only when r < half its size, and kept whole
        otherwise, so r never makes a factor larger than the layer it adapts."""
        return {}


register_method(
    MethodSpec(
        name="lokr",
        config_cls=LoKrConfig,
        layer="deltatune.methods._lokr_layer:LoKrLayer",
        tuner="deltatune.methods._lycoris:LoKrModel",
        prefix="lokr_",
        display_name="LoKr",
        listing_order=30,
    )
)

__getattr__ = forward_attributes(__name__, "._lokr_layer")
