"""KaSA: knowledge-aware singular-value adaptation (Wang et al., 2024, "KaSA: Knowledge-Aware Singular-Value
Adaptation of Large Language Models"), as PEFT defines it (``LoraConfig(kasa_config=KasaConfig())``).

    W₀ ← W without its r smallest singular components (once, when the adapter is added)
    y = W₀ x + s · B diag(d) A dropout(x),   d ∈ R^r learnt (``lora_diag``)

Adding a KaSA adapter rewrites the base weight for good (disabling or unloading it keeps the truncated weight;
reloading the adapter onto the original base truncates again, identically), so KaSA adapters cannot share a
model with other adapters. The paper's regularisers, β·Σd² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F), are returned by
``LoraModel._get_kasa_loss()`` for the user to add to the loss, as in PEFT. Linear layers only.

KaSA is LoRA's config with a ``kasa_config``; this module registers the method (no torch, unlisted: it is a
LoRA option, not a ``--method``), and its layer lives in :mod:`._kasa_layer`, imported on first use.
"""

from __future__ import annotations

from ..registry import MethodSpec, register_method
from ._lazy import forward_attributes
from .lora import LoraConfig

__all__: list[str] = []

register_method(
    MethodSpec(
        name="kasa",
        config_cls=LoraConfig,
        layer="deltatune.methods._kasa_layer:KasaLayer",
        prefix="lora_",
        tuner="deltatune.methods._lora_model:LoraModel",
        selects=lambda config: config.kasa_config is not None,
        config_defaults={"kasa_config": {}},
        display_name="KaSA",
        peft_config_name="LoraConfig",
        extends="lora",
        listing_order=90,
        listed=False,
    )
)

__getattr__ = forward_attributes(__name__, "._kasa_layer")
