"""PEFT's API where deltatune accepted or recorded something else, compared with peft on the same tiny model
(the u-lib tester's L14, L16, L17): AdaLoRA's ``add_weighted_adapter`` is refused, a ``layers_to_transform``
that selects no layer is named in the error, and a task type's heads are recorded in the config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import tiny_llama
from torch import nn
from transformers import LlamaConfig, LlamaForQuestionAnswering, LlamaForSequenceClassification

import deltatune as dt

peft = pytest.importorskip("peft")
LIBRARIES = pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))


@LIBRARIES
def test_adalora_refuses_add_weighted_adapter(library: Any) -> None:
    config = library.AdaLoraConfig(init_r=4, target_r=2, target_modules=["0"], total_step=10)
    model = library.get_peft_model(_mlp(), config)
    with pytest.raises(TypeError, match="AdaLoraModel does not support add_weighted_adapter"):
        model.add_weighted_adapter(["default"], [1.0], "single", combination_type="linear")
    assert "single" not in model.peft_config


@LIBRARIES
def test_layers_to_transform_that_selects_nothing_is_named(library: Any) -> None:
    config = library.LoraConfig(
        r=2, target_modules=["q_proj"], layers_to_transform=[5], layers_pattern="layers"
    )
    with pytest.raises(ValueError, match=r"Note: You specified 'layers_to_transform': \[5\]") as caught:
        library.get_peft_model(tiny_llama(), config)
    assert "closest" not in str(caught.value)  # not the target name offered back as the closest match
    if library is dt:  # deltatune also says why: q_proj exists, in layers 0 and 1 only
        assert "selects none of them: their layer indices are [0, 1]" in str(caught.value)


def _llama_for(task_type: str) -> nn.Module:
    if task_type == "CAUSAL_LM":
        return tiny_llama()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
    )
    return (LlamaForQuestionAnswering if task_type == "QUESTION_ANS" else LlamaForSequenceClassification)(
        config
    )


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM"])
def test_task_type_heads_are_recorded_in_modules_to_save_as_peft(task_type: str, tmp_path: Path) -> None:
    recorded = []
    for library in (dt, peft):
        config = library.LoraConfig(r=2, target_modules=["q_proj"], task_type=task_type)
        model = library.get_peft_model(_llama_for(task_type), config)
        model.add_adapter("other", library.LoraConfig(r=2, target_modules=["v_proj"], task_type=task_type))
        model.save_pretrained(tmp_path / library.__name__)
        saved = json.loads((tmp_path / library.__name__ / "adapter_config.json").read_text())
        configs = model.peft_config
        recorded.append(
            (configs["default"].modules_to_save, configs["other"].modules_to_save, saved["modules_to_save"])
        )
    assert recorded[0] == recorded[1]
    if task_type != "CAUSAL_LM":
        assert recorded[0][0] is not None
