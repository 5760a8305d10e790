"""LoRA's further targets against peft as the oracle: ``trainable_token_indices`` (and the trainable-tokens
layer it uses), ``ensure_weight_tying`` with tied embeddings. Tiny Llama/GPT-2 models built from configs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import deltatune

peft = pytest.importorskip("peft")

X = torch.tensor([[1, 2, 3, 5, 7, 11]])


def llama(tie: bool = True) -> LlamaForCausalLM:
    return tiny_llama(tie=tie)


def gpt2(tie: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, tie_word_embeddings=tie
    )
    model = GPT2LMHeadModel(config).eval()
    model.tie_weights()
    return model


def _wrap(lib: Any, model: torch.nn.Module, **kwargs: Any) -> tuple[Any, list[str]]:
    """``lib.get_peft_model`` and the warnings it gave (transformers' own left out)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = lib.get_peft_model(model, lib.LoraConfig(**kwargs))
    texts = sorted(str(w.message) for w in caught if "gradient_checkpointing" not in str(w.message))
    return wrapped, texts


def _trainable(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Moves every trainable tensor, so that a saved adapter is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def _adapter_keys(folder: Path) -> list[str]:
    return sorted(
        k for k in load_file(folder / "adapter_model.safetensors") if "embed_tokens.weight" not in k
    )


TIED_CASES = {
    "tokens-list": dict(trainable_token_indices=[1, 3, 5]),
    "tokens-dict-same": dict(trainable_token_indices={"embed_tokens": [1, 3], "lm_head": [1, 3]}),
    "tokens-dict-differ": dict(trainable_token_indices={"embed_tokens": [1, 3], "lm_head": [2, 5]}),
    "tokens-ensure": dict(trainable_token_indices=[2, 7], ensure_weight_tying=True),
    "save-embed-ensure": dict(modules_to_save=["embed_tokens"], ensure_weight_tying=True),
    "save-head-ensure": dict(modules_to_save=["lm_head"], ensure_weight_tying=True),
    "lora-embed-ensure": dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True),
    "lora-head-ensure": dict(target_modules=["q_proj", "lm_head"], ensure_weight_tying=True),
    "lora-regex-ensure": dict(target_modules=r".*q_proj|lm_head", ensure_weight_tying=True),
}


@pytest.mark.parametrize("case", sorted(TIED_CASES))
def test_tied_llama_matches_peft_both_ways(case: str, tmp_path: Path) -> None:
    """Same trainable tensors (names, shapes), config rewrite, warnings and saved keys as peft; each library
    loads the other's file to the same logits; merging and unloading keeps the tie as peft does."""
    kwargs = {"target_modules": ["q_proj"], "init_lora_weights": False, **TIED_CASES[case]}
    theirs, their_warnings = _wrap(peft, llama(), **kwargs)
    ours, our_warnings = _wrap(deltatune, llama(), **kwargs)
    assert _trainable(ours) == _trainable(theirs)
    assert (
        sum(p.numel() for p in ours.parameters() if p.requires_grad)
        == theirs.get_nb_trainable_parameters()[0]
    )
    assert our_warnings == their_warnings
    for field in ("modules_to_save", "target_modules"):
        assert getattr(ours.peft_config["default"], field) == getattr(theirs.peft_config["default"], field)
    _perturb(theirs, 1)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = deltatune.PeftModel.from_pretrained(llama(), tmp_path / "peft")
    torch.testing.assert_close(_logits(loaded), _logits(theirs), atol=1e-5, rtol=1e-5)
    _perturb(loaded, 2)
    loaded.save_pretrained(tmp_path / "ours")
    assert _adapter_keys(tmp_path / "ours") == _adapter_keys(tmp_path / "peft")
    back = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours")
    expected = _logits(loaded)
    torch.testing.assert_close(_logits(back), expected, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged, their_merged = loaded.merge_and_unload(), back.merge_and_unload()
    torch.testing.assert_close(_logits(merged), _logits(their_merged), atol=1e-4, rtol=1e-4)
    tied = merged.lm_head.weight is merged.model.embed_tokens.weight
    assert tied == (their_merged.lm_head.weight is their_merged.model.embed_tokens.weight)
    assert type(merged.model.embed_tokens) is type(their_merged.model.embed_tokens)


def test_trainable_tokens_train_only_their_rows_and_the_head_follows() -> None:
    model, _ = _wrap(deltatune, llama(), target_modules=["q_proj"], trainable_token_indices=[1, 3])
    before = model.base_model.model.model.embed_tokens.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    model(X, labels=X).loss.backward()
    optimizer.step()
    embed, head = model.base_model.model.model.embed_tokens, model.base_model.model.lm_head
    after = embed.weight.detach()
    changed = sorted(int(i) for i in (after - before).abs().sum(dim=1).nonzero())
    assert changed == [1, 3]
    assert torch.equal(head.weight, embed.weight)  # the tied head reads the same rows
    assert head.token_adapter.tied_adapter is embed.token_adapter
    assert not head.token_adapter.export_tensors("default")  # saved once, under the embedding


def test_trainable_tokens_disable_merge_unmerge() -> None:
    base = _logits(llama())
    model, _ = _wrap(deltatune, llama(), target_modules=["q_proj"], trainable_token_indices=[1, 3])
    _perturb(model, 3)
    adapted = _logits(model)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base)
    model.base_model.merge_adapter()
    torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=1e-5)
    model.base_model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base)


def test_trainable_tokens_second_adapter_stays_frozen_and_switches(tmp_path: Path) -> None:
    model, _ = _wrap(deltatune, llama(), target_modules=["q_proj"], trainable_token_indices=[1, 3])
    model.add_adapter("other", deltatune.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[4]))
    layer = model.base_model.model.model.embed_tokens.token_adapter
    assert not layer.trainable_tokens_delta["other"].requires_grad
    model.set_adapter("other")
    assert layer.trainable_tokens_delta["other"].requires_grad
    assert not layer.trainable_tokens_delta["default"].requires_grad
    model.save_pretrained(tmp_path)
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in load_file(
        tmp_path / "other" / "adapter_model.safetensors"
    )


def test_gpt2_tied_tokens_match_peft(tmp_path: Path) -> None:
    kwargs = {"target_modules": ["c_attn"], "trainable_token_indices": [0, 4], "init_lora_weights": False}
    theirs, _ = _wrap(peft, gpt2(), **kwargs)
    ours, _ = _wrap(deltatune, gpt2(), **kwargs)
    assert _trainable(ours) == _trainable(theirs)
    _perturb(theirs, 4)
    theirs.save_pretrained(tmp_path)
    loaded = deltatune.PeftModel.from_pretrained(gpt2(), tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(theirs), atol=1e-5, rtol=1e-5)


def test_untied_model_warnings_as_peft() -> None:
    for kwargs in (
        {"target_modules": ["q_proj", "lm_head"], "ensure_weight_tying": True},
        {"target_modules": ["q_proj"], "trainable_token_indices": [1], "ensure_weight_tying": True},
    ):
        _, theirs = _wrap(peft, llama(tie=False), **kwargs)
        ours_model, ours = _wrap(deltatune, llama(tie=False), **kwargs)
        assert ours == theirs and ours
        assert (
            "lm_head.token_adapter" not in dict(ours_model.named_modules())
            or "trainable_token_indices" in kwargs
        )


def test_tied_target_without_the_flag_warns_as_peft() -> None:
    _, theirs = _wrap(peft, llama(), target_modules=["q_proj", "lm_head"])
    model, ours = _wrap(deltatune, llama(), target_modules=["q_proj", "lm_head"])
    assert ours == theirs and "ensure_weight_tying` is not set to True" in ours[0]
    with pytest.warns(UserWarning, match="are part of the adapter"):
        model.merge_and_unload()


def test_mismatched_tied_indices_with_the_flag_are_refused() -> None:
    indices = {"embed_tokens": [1], "lm_head": [2]}
    with pytest.raises(ValueError, match="Cannot ensure weight tying"):
        deltatune.get_peft_model(
            llama(),
            deltatune.LoraConfig(
                target_modules=["q_proj"], trainable_token_indices=indices, ensure_weight_tying=True
            ),
        )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"embed_tokens": "1"}, "trainable_token_indices="),
        ([1.5], "trainable_token_indices="),
    ],
)
def test_bad_token_indices_are_refused(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        deltatune.LoraConfig(target_modules=["q_proj"], trainable_token_indices=value)


def test_token_indices_outside_the_vocabulary_and_with_modules_to_save_are_refused() -> None:
    with pytest.raises(ValueError, match="outside the embedding of 50 tokens"):
        deltatune.get_peft_model(
            llama(), deltatune.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[50])
        )
    config = deltatune.LoraConfig(
        target_modules=["q_proj"],
        modules_to_save=["embed_tokens"],
        trainable_token_indices={"embed_tokens": [1]},
    )
    with pytest.raises(ValueError, match="already marked to be trained fully"):
        deltatune.get_peft_model(llama(), config)
