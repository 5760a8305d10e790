"""LoRA's ``layer_replication`` (PEFT's ``replicate_layers``) against peft as the oracle, on tiny Llama and
BERT models built from configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import deltatune

peft = pytest.importorskip("peft")

TOKENS = torch.tensor([[1, 2, 3, 4]])
SMALL = {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3}


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL, num_attention_heads=2, num_key_value_heads=2)).eval()


def bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(**SMALL, num_attention_heads=2)).eval()


def _out(model: Any) -> torch.Tensor:
    with torch.no_grad():
        result = model(TOKENS)
    logits = getattr(result, "logits", None)
    return logits if logits is not None else result.last_hidden_state


@pytest.mark.parametrize(("make", "targets"), [(llama, ["q_proj", "v_proj"]), (bert, ["query", "value"])])
def test_matches_peft_both_ways(make: Any, targets: list[str], tmp_path: Path) -> None:
    kwargs = {"target_modules": targets, "layer_replication": [[0, 2], [1, 3]], "init_lora_weights": False}
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kwargs))
    ours = deltatune.get_peft_model(make(), deltatune.LoraConfig(**kwargs))
    trainable = {n: tuple(p.shape) for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n: tuple(p.shape) for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 * 2 * 2  # 4 layers (0, 1, 1, 2) × 2 targets × (A, B)
    assert sum(p.numel() for p in ours.parameters()) == theirs.get_nb_trainable_parameters()[1]
    assert ours.base_model.model.config.num_hidden_layers == 4
    theirs.save_pretrained(tmp_path / "peft")
    loaded = deltatune.PeftModel.from_pretrained(make(), tmp_path / "peft")
    torch.testing.assert_close(_out(loaded), _out(theirs), atol=1e-5, rtol=1e-5)
    loaded.save_pretrained(tmp_path / "ours")
    keys = sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    torch.testing.assert_close(_out(back), _out(loaded), atol=1e-5, rtol=1e-5)


def test_copies_share_base_weights_and_train_their_own_adapters() -> None:
    model = deltatune.get_peft_model(
        llama(), deltatune.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 3]])
    )
    layers = model.base_model.model.model.layers
    assert layers[1].self_attn.q_proj.base_layer.weight is layers[2].self_attn.q_proj.base_layer.weight
    assert (
        layers[1].self_attn.q_proj.lora_A["default"].weight
        is not layers[2].self_attn.q_proj.lora_A["default"].weight
    )
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="Cannot merge LORA layers when base model layers are replicated"):
        model.merge_and_unload()
    model.unload()  # unloading without merging is fine


def test_bad_replication_is_refused() -> None:
    with pytest.raises(ValueError, match="layer_replication="):
        deltatune.LoraConfig(target_modules=["q_proj"], layer_replication=[0, 2])
    with pytest.raises(ValueError, match="outside the model's 3 layers"):
        deltatune.get_peft_model(
            llama(), deltatune.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 4]])
        )
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="Could not locate the layers attribute"):
        deltatune.get_peft_model(
            plain, deltatune.LoraConfig(target_modules=["0"], layer_replication=[[0, 1]])
        )
