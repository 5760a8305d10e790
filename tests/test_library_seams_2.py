"""The PEFT API as a ported script uses it, compared with peft on the same tiny models (the u-lib tester's
findings L18-L22): ``load_adapter`` into an existing adapter, plain ``transformers.Trainer`` saving and resuming,
which embeddings ``save_embedding_layers`` writes, and peft's public names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt

peft = pytest.importorskip("peft")

LIBRARIES = pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@LIBRARIES
def test_load_adapter_into_the_trained_adapter_keeps_it_trainable(library: object, tmp_path: Path) -> None:
    lib: object = library
    config = {"r": 2, "target_modules": ["0"], "modules_to_save": ["2"]}
    saved = lib.get_peft_model(_mlp(), lib.LoraConfig(init_lora_weights=False, **config))  # type: ignore[attr-defined]
    saved.save_pretrained(tmp_path)
    model = lib.get_peft_model(_mlp(), lib.LoraConfig(**config))  # type: ignore[attr-defined]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    model.load_adapter(tmp_path, adapter_name="default")  # restore the weights; is_trainable left at False
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    assert len(trainable) == 4  # lora_A, lora_B and the head copy's weight and bias
    x = torch.randn(3, 4)
    assert torch.allclose(model(x), saved(x))  # the weights were replaced
    assert not model.training  # is_trainable=False still puts the model in eval mode, as peft
    model(x).pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


@LIBRARIES
def test_load_adapter_new_adapter_not_trainable_stays_frozen(library: object, tmp_path: Path) -> None:
    lib: object = library
    lib.get_peft_model(_mlp(), lib.LoraConfig(r=2, target_modules=["0"])).save_pretrained(tmp_path)  # type: ignore[attr-defined]
    model = lib.get_peft_model(_mlp(), lib.LoraConfig(r=2, target_modules=["0"]))  # type: ignore[attr-defined]
    model.load_adapter(tmp_path, adapter_name="other")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".default" in n)
