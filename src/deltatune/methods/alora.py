"""aLoRA: activated LoRA (Greenewald et al., 2025, "Activated LoRA: Fine-tuned LLMs for Intrinsics"), as PEFT
defines it (``LoraConfig(alora_invocation_tokens=[...], task_type="CAUSAL_LM")``).

    y_t = W x_t + s · B A dropout(x_t)   for the positions t from the last occurrence of the invocation tokens on
    y_t = W x_t                          before it (and in rows without it)

so a model can switch the adapter on mid-sequence and reuse the base model's KV cache of everything before the
invocation. The positions come from ``input_ids`` in each forward and ``generate`` call (tokens generated after
the prompt are always adapted); with only ``inputs_embeds`` the adapter stays off, with PEFT's warning. An aLoRA
adapter cannot be merged (PEFT's ``NotImplementedError``). Linear layers only.

aLoRA is LoRA's config with ``alora_invocation_tokens``; this module registers the method (no torch, unlisted:
it is a LoRA option, not a ``--method``), and its layer lives in :mod:`._alora_layer`, imported on first use.
"""

from __future__ import annotations

from ..registry import MethodSpec, register_method
from ._lazy import forward_attributes
from .lora import LoraConfig

__all__: list[str] = []

register_method(
    MethodSpec(
        name="alora",
        config_cls=LoraConfig,
        layer="deltatune.methods._alora_layer:ALoraLayer",
        prefix="lora_",
        tuner="deltatune.methods._lora_model:LoraModel",
        selects=lambda config: bool(config.alora_invocation_tokens),
        config_defaults={"alora_invocation_tokens": [0], "task_type": "CAUSAL_LM"},
        display_name="aLoRA",
        peft_config_name="LoraConfig",
        extends="lora",
        listing_order=95,
        listed=False,
    )
)

__getattr__ = forward_attributes(__name__, "._alora_layer")
