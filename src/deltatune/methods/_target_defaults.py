"""``target_modules`` used when a config gives none, per transformers ``model_type`` (PEFT's defaults).

Facts about where each architecture keeps its attention projections. LoRA, DoRA, LoHa and LoKr share
:data:`LORA_DEFAULT_TARGETS`; AdaLoRA has its own, wider table. Beyond PEFT's tables deltatune knows the
vision transformers (``vit``, ``deit``): their query/value projections, under their transformers 4.x names
(which also match transformers 5's ``q_proj``/``v_proj`` through deltatune's name aliases).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["ADALORA_DEFAULT_TARGETS", "LORA_DEFAULT_TARGETS"]

_QV_PROJ = ["q_proj", "v_proj"]
_QUERY_VALUE = ["query", "value"]
_FUSED_QKV = ["query_key_value"]

LORA_DEFAULT_TARGETS: Mapping[str, list[str] | str] = MappingProxyType(
    {
        "t5": ["q", "v"],
        "mt5": ["q", "v"],
        "bart": _QV_PROJ,
        "gpt2": ["c_attn"],
        "bloom": _FUSED_QKV,
        "blip-2": ["q", "v", "q_proj", "v_proj"],
        "opt": _QV_PROJ,
        "gptj": _QV_PROJ,
        "gpt_neox": _FUSED_QKV,
        "gpt_neo": _QV_PROJ,
        "bert": _QUERY_VALUE,
        "roberta": _QUERY_VALUE,
        "xlm-roberta": _QUERY_VALUE,
        "electra": _QUERY_VALUE,
        "deberta-v2": ["query_proj", "value_proj"],
        "deberta": ["in_proj"],
        "layoutlm": _QUERY_VALUE,
        "llama": _QV_PROJ,
        "llama4": _QV_PROJ,
        "chatglm": _FUSED_QKV,
        "gpt_bigcode": ["c_attn"],
        "mpt": ["Wqkv"],
        "RefinedWebModel": _FUSED_QKV,
        "RefinedWeb": _FUSED_QKV,
        "falcon": _FUSED_QKV,
        "btlm": ["c_proj", "c_attn"],
        "codegen": ["qkv_proj"],
        "mistral": _QV_PROJ,
        "mixtral": _QV_PROJ,
        "stablelm": _QV_PROJ,
        "phi": ["q_proj", "v_proj", "fc1", "fc2"],
        "gemma": _QV_PROJ,
        "gemma2": _QV_PROJ,
        "gemma3_text": _QV_PROJ,
        "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
        "qwen2": _QV_PROJ,
        "qwen3": _QV_PROJ,
        "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "rwkv": ["key", "value", "receptance", "output"],
        "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
        # deltatune's additions (not in PEFT's table): the guide's ViT targets
        "vit": _QUERY_VALUE,
        "deit": _QUERY_VALUE,
    }
)

ADALORA_DEFAULT_TARGETS: Mapping[str, list[str] | str] = MappingProxyType(
    {
        "t5": ["q", "k", "v", "o", "wi", "wo"],
        "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
        "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "gpt2": ["c_attn"],
        "bloom": _FUSED_QKV,
        "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "gptj": _QV_PROJ,
        "gpt_neox": _FUSED_QKV,
        "gpt_neo": _QV_PROJ,
        "llama": _QV_PROJ,
        "llama4": _QV_PROJ,
        "bert": _QUERY_VALUE,
        "roberta": ["query", "key", "value", "dense"],
        "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
        "gpt_bigcode": ["c_attn"],
        "deberta": ["in_proj"],
        "gemma": _QV_PROJ,
        "gemma2": _QV_PROJ,
        "gemma3_text": _QV_PROJ,
        "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
        "qwen2": _QV_PROJ,
        "qwen3": _QV_PROJ,
        "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "vit": _QUERY_VALUE,
        "deit": _QUERY_VALUE,
    }
)
