"""IA³: infused adapter by inhibiting and amplifying inner activations (Liu et al., NeurIPS 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").

    y = l ⊙ (W x + b)           (an attention module: the output scaled)
    y = W (l ⊙ x) + b           (a feed-forward module: the input scaled)

One learned vector ``l`` per targeted module (``ia3_l``, initialised to ones, so the model starts as the
base), of the module's output size, or its input size for the modules listed in ``feedforward_modules``.
Merging folds ``l`` into W (rows, or columns for a feed-forward module) and, for an output-scaled module,
into the bias; unmerging divides it out again (exact up to float rounding, as in PEFT).

The config and the registration live here (no torch); the layer in :mod:`._ia3_layer`, imported on first
use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from .. import _regex
from ..config import TargetingConfig, check_names, help_field
from ..registry import MethodSpec, register_method
from ._lazy import forward_attributes

__all__ = ["IA3Config"]

_BERT_LIKE = (["key", "value", "output.dense"], ["output.dense"])
_QV_DOWN = (["q_proj", "v_proj", "down_proj"], ["down_proj"])
_KV_DOWN = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
_FUSED = (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])

#: (target_modules, feedforward_modules) per transformers ``model_type``: PEFT's IA³ defaults, plus the vision
#: transformers, which follow BERT's layout (key/value projections and ``output.dense``, under their
#: transformers 4.x names, which also match transformers 5's ``k_proj``/``v_proj``/``o_proj``/``mlp.fc2``).
IA3_DEFAULTS: Mapping[str, tuple[list[str], list[str]]] = MappingProxyType(
    {
        "t5": (["k", "v", "wo"], ["wo"]),
        "mt5": (["k", "v", "wi_1"], []),
        "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
        "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
        "roberta": _BERT_LIKE,
        "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
        "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
        "gpt_neox": _FUSED,
        "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
        "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
        "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
        "llama": _KV_DOWN,
        "llama4": _QV_DOWN,
        "mistral": _KV_DOWN,
        "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
        "bert": _BERT_LIKE,
        "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
        "deberta": (["in_proj", "output.dense"], ["output.dense"]),
        "RefinedWebModel": _FUSED,
        "RefinedWeb": _FUSED,
        "falcon": _FUSED,
        "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
        "gemma": _QV_DOWN,
        "gemma2": _QV_DOWN,
        "gemma3_text": _QV_DOWN,
        "qwen2": _QV_DOWN,
        "qwen3": _QV_DOWN,
        "vit": _BERT_LIKE,
        "deit": _BERT_LIKE,
    }
)


@dataclass
class IA3Config(TargetingConfig):
    """Configuration of IA³ (PEFT's ``IA3Config`` fields, defaults and JSON keys; each field's description is
    its ``help`` metadata)."""

    feedforward_modules: list[str] | set[str] | str | None = help_field(
        "Targeted modules whose input is scaled instead of their output (the feed-forward layers of the paper): "
        "a list of names that a module's name ends with, or a regex string; they must be among target_modules.",
        None,
    )
    fan_in_fan_out: bool = help_field(
        "Whether the base weight is stored as (in, out), as in transformers' Conv1D; corrected to the layer's "
        "real layout with a warning.",
        False,
    )
    init_ia3_weights: bool = help_field(
        "Whether to start every vector at ones (the base model unchanged); false starts them random.", True
    )

    PEFT_TYPE: ClassVar[str] = "IA3"
    MODULE_LIST_FIELDS: ClassVar[tuple[str, ...]] = ("target_modules", "feedforward_modules")
    DEFAULT_TARGET_MODULES: ClassVar[Mapping[str, list[str] | str]] = MappingProxyType(
        {model_type: targets for model_type, (targets, _) in IA3_DEFAULTS.items()}
    )
    #: ``deltatune train``: the targets and feed-forward modules of the model's type (``fill_model_defaults``).
    RECIPE_DEFAULTS: ClassVar[dict[str, Any]] = {"target_modules": None, "feedforward_modules": None}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.feedforward_modules = check_names("feedforward_modules", self.feedforward_modules)
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights={self.init_ia3_weights!r} must be true or false")
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(targets, set) and isinstance(feedforward, set) and not feedforward <= targets:
            # PEFT's exact message (its tests anchor it); the entries at fault are feedforward - target_modules
            raise ValueError("`feedforward_modules` should be a subset of `target_modules`")

    def fill_model_defaults(self, model_type: str | None) -> bool:
        """``target_modules`` and, unless given, ``feedforward_modules`` for the model type (PEFT's tables)."""
        if model_type not in IA3_DEFAULTS:
            return False
        targets, feedforward = IA3_DEFAULTS[str(model_type)]
        self.target_modules = set(targets)
        if self.feedforward_modules is None:
            self.feedforward_modules = set(feedforward)
        return True

    def module_options(self, module_names: list[str]) -> dict[str, Any]:
        """``{"is_feedforward": ...}``: whether any of the module's names is a feed-forward module (a full
        match of a regex string, or a name ending with a list entry, as in PEFT)."""
        entries = self.feedforward_modules
        if entries is None:
            return {"is_feedforward": False}
        if isinstance(entries, str):
            hit = any(_regex.fullmatch(entries, name, "feedforward_modules") for name in module_names)
        else:
            hit = any(name.endswith(entry) for name in module_names for entry in entries)
        return {"is_feedforward": hit}


register_method(
    MethodSpec(
        name="ia3",
        config_cls=IA3Config,
        layer="deltatune.methods._ia3_layer:IA3Layer",
        tuner="deltatune.methods._ia3_layer:IA3Model",
        prefix="ia3_",
        display_name="IA³",
        listing_order=60,
    )
)

__getattr__ = forward_attributes(__name__, "._ia3_layer")
