"""LoHa: low-rank Hadamard product (Hyeon-Woo et al., 2022, "FedPara"; LyCORIS).

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),   Wia ∈ R^{out×r}, Wib ∈ R^{r×in},   s = alpha / r

Fast path (Linear): the Hadamard product of two rank-r matrices is exactly rank ≤ r² through
Khatri-Rao factors, ΔW = U V with U = W1a •ʳ W2a (out×r², row-wise Kronecker) and V = W1b •ᶜ W2b
(r²×in, column-wise Kronecker), so y = s · (x Vᵀ) Uᵀ costs r²(in+out) per token instead of
forming the out×in ΔW. It is used whenever r² < in·out/(in+out); otherwise ΔW is materialised.

Conv2d with ``use_effective_conv2d`` (CP form): ΔW = rebuild(t1, w1a, w1b) ⊙ rebuild(t2, w2a, w2b)
with rebuild[p, q, k, l] = Σ_ij t[i, j, k, l] · wb[j, q] · wa[i, p] (wa is (r, out), wb (r, in)).

The config and the registration live here (no torch); the maths and the layer in :mod:`._loha_layer`,
imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..registry import MethodSpec, register_method
from ._lazy import forward_attributes
from ._lycoris_config import LycorisConfig

__all__ = ["LoHaConfig"]


@dataclass
class LoHaConfig(LycorisConfig):
    """Configuration of LoHa (PEFT's ``LoHaConfig`` fields, defaults and JSON keys; each field's description
    is its ``help`` metadata). ``r`` is the rank of each of the two factor pairs, so the update has rank up to
    r²; with ``init_weights`` true, w2b starts at zero."""

    PEFT_TYPE: ClassVar[str] = "LOHA"


register_method(
    MethodSpec(
        name="loha",
        config_cls=LoHaConfig,
        layer="deltatune.methods._loha_layer:LoHaLayer",
        tuner="deltatune.methods._lycoris:LoHaModel",
        prefix="hada_",
        display_name="LoHa",
        listing_order=20,
    )
)

__getattr__ = forward_attributes(__name__, "._loha_layer")
