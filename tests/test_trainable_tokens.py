"""The standalone trainable-tokens method (PEFT's ``TrainableTokensConfig``/``TrainableTokensModel``) against
peft as the oracle, on tiny Llama models built from configs (tied and untied embeddings)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune

peft = pytest.importorskip("peft")

X = torch.tensor([[1, 2, 3, 5, 7]])


def llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).eval()
    model.tie_weights()  # as from_pretrained does: the tie must not depend on what ran before in this process
    return model


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize(
    "kwargs", [{"token_indices": [1, 3]}, {"token_indices": [4], "target_modules": ["embed_tokens"]}]
)
def test_matches_peft_both_ways(tie: bool, kwargs: dict[str, Any], tmp_path: Path) -> None:
    theirs = peft.get_peft_model(llama(tie), peft.TrainableTokensConfig(**kwargs))
    ours = deltatune.get_peft_model(llama(tie), deltatune.TrainableTokensConfig(**kwargs))
    trainable = {n: tuple(p.shape) for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n: tuple(p.shape) for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(ours.state_dict()) == set(theirs.state_dict())
    torch.testing.assert_close(_logits(ours), _logits(llama(tie)))  # a no-op at initialisation
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    loaded = deltatune.PeftModel.from_pretrained(llama(tie), tmp_path / "peft")
    torch.testing.assert_close(_logits(loaded), _logits(theirs), atol=1e-5, rtol=1e-5)
    loaded.save_pretrained(tmp_path / "ours")
    for name in ("adapter_model.safetensors",):
        assert sorted(load_file(tmp_path / "ours" / name)) == sorted(load_file(tmp_path / "peft" / name))
    ours_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(ours_json) == set(json.loads((tmp_path / "peft" / "adapter_config.json").read_text()))
    back = peft.PeftModel.from_pretrained(llama(tie), tmp_path / "ours")
    torch.testing.assert_close(_logits(back), _logits(loaded), atol=1e-5, rtol=1e-5)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(_logits(merged), _logits(back.merge_and_unload()), atol=1e-5, rtol=1e-5)
    assert type(merged.model.embed_tokens) is torch.nn.Embedding


def test_is_exported_registered_and_not_listed() -> None:
    spec = deltatune.get_method("trainable_tokens")
    assert deltatune.TrainableTokensConfig is spec.config_cls
    assert deltatune.TrainableTokensModel is spec.tuner_cls
    assert "trainable_tokens" not in deltatune.available_methods()
    config = deltatune.PeftConfig.from_dict({"peft_type": "TRAINABLE_TOKENS", "token_indices": [1]})
    assert isinstance(config, deltatune.TrainableTokensConfig)


def test_only_the_rows_train_and_a_second_adapter_switches() -> None:
    model = deltatune.get_peft_model(llama(True), deltatune.TrainableTokensConfig(token_indices=[2]))
    model.add_adapter("b", deltatune.TrainableTokensConfig(token_indices=[5]))
    layer = model.base_model.model.model.embed_tokens
    assert not layer.trainable_tokens_delta["b"].requires_grad
    before = layer.weight.detach().clone()
    model.train()
    model(X, labels=X).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    merged = layer.merged_weights(["default"])
    assert sorted(int(i) for i in (merged - before).abs().sum(dim=1).nonzero()) == [2]
    model.set_adapter("b")
    assert (
        layer.trainable_tokens_delta["b"].requires_grad
        and not layer.trainable_tokens_delta["default"].requires_grad
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_indices": "1"}, "token_indices="),
        ({"token_indices": [1], "init_weights": "no"}, "init_weights="),
        ({"token_indices": [1], "modules_to_save": ["lm_head"]}, "not an option of TrainableTokensConfig"),
    ],
)
def test_bad_configs_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        deltatune.TrainableTokensConfig(**kwargs)
