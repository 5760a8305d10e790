"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024, "DoRA: Weight-Decomposed Low-Rank
Adaptation"), as PEFT defines it (``LoraConfig(use_dora=True)``).

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_c,   y = W' x + b

The adapted weight is split into a learned magnitude ``m`` (one per output channel, initialised to the norm
of each output row of W + ΔW) and a direction, LoRA's W + s·B A normalised row by row. As in the paper
(§4.3) and in PEFT, the norm is treated as a constant in backward (it is detached), so ``m`` and the LoRA
factors learn through ``(m / ‖·‖) ⊙ (x Wᵀ + s·x Aᵀ Bᵀ)``. With input dropout p > 0 in training, PEFT's
formula is kept exactly: ``base(x) + (m/‖·‖ − 1) ⊙ base₀(x_d) + (m/‖·‖) ⊙ s·B A x_d`` (x_d the dropped
input, base₀ the base op without bias).

Saved like PEFT: LoRA's ``lora_A``/``lora_B`` plus ``lora_magnitude_vector`` of shape (out,) for a Linear and
(1, out, 1, 1) for a Conv2d.

Cost: the row norm comes from the identity

    ‖W + s B A‖²_row = ‖W‖²_row + 2s · rowsum((W Aᵀ) ⊙ B) + s² · rowsum((B (A Aᵀ)) ⊙ B)

(out·in·r MACs, no out×in temporary; ‖W‖² is computed once while W is unchanged), and without dropout the
output is a row rescaling of the fused LoRA GEMM, so a training step runs one base GEMM per layer, not PEFT's
two plus a materialised ΔW. With dropout, PEFT's formula needs the second GEMM (on the dropped input); on a
plain Linear it runs as one autograd node (:mod:`._dora_fused`) with no N × out temporaries but one.

DoRA is LoRA's config with ``use_dora=True``; this module registers the method (no torch), and its layers
live in :mod:`._dora_layer`, imported on first use.
"""

from __future__ import annotations

from ..registry import MethodSpec, register_method
from ._lazy import forward_attributes
from .lora import LoraConfig

__all__: list[str] = []

register_method(
    MethodSpec(
        name="dora",
        config_cls=LoraConfig,
        layer="deltatune.methods._dora_layer:DoraLayer",
        layer_kinds=("deltatune.methods._dora_layer:DoraEmbeddingLayer",),
        prefix="lora_",
        tuner="deltatune.methods._lora_model:LoraModel",
        selects=lambda config: bool(config.use_dora),
        config_defaults={"use_dora": True},
        display_name="DoRA",
        peft_config_name="LoraConfig",
        extends="lora",
        listing_order=50,
    )
)

__getattr__ = forward_attributes(__name__, "._dora_layer")
