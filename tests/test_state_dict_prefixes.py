"""Which state-dict keys belong to the adapter method, told by the model's structure
(:func:`deltatune.serialization.adapter_key_prefixes`, PEFT's ``_get_tuner_state_dict_key_prefixes``), compared
with peft on the same models."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model as peft_get_peft_model
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from torch import nn

from deltatune import LoraConfig, get_peft_model
from deltatune.serialization import adapter_key_prefixes, filter_state_dict_by_key_prefixes


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 8)
        self.lora_foobar = nn.Linear(8, 2)  # a base module named like an adapter's tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_foobar(self.lin1(self.lin0(self.emb(x))))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["lin0"]},
        {"target_modules": ["lin0", "lin1"], "modules_to_save": ["lora_foobar"]},
        {"target_modules": ["lin0"], "trainable_token_indices": {"emb": [0, 1]}},
        {"target_modules": ["lin0"], "use_dora": True},
    ],
)
def test_prefixes_are_peft_s(kwargs: dict) -> None:
    ours = get_peft_model(_Net(), LoraConfig(**kwargs))
    theirs = peft_get_peft_model(_Net(), PeftLoraConfig(**kwargs))
    ours.add_adapter("other", LoraConfig(target_modules=["lin1"]))
    theirs.add_adapter("other", PeftLoraConfig(target_modules=["lin1"]))
    for adapter in (None, "default", "other"):
        # PEFT's LoRA layers also carry empty containers (lora_embedding_A on a Linear, ...): ours name a subset,
        # and select the same tensors
        got, want = adapter_key_prefixes(ours, adapter), _get_tuner_state_dict_key_prefixes(theirs, adapter)
        assert got and got <= want, got - want
        assert not any("lora_foobar" in p or "base_layer" in p or ".emb" in p for p in got)
        selected = sorted(filter_state_dict_by_key_prefixes(ours.state_dict(), got))
        theirs_selected = _filter_state_dict_by_key_prefixes(theirs.state_dict(), want)
        # DoRA's magnitude too: state_dict() has PEFT's key (``...lora_magnitude_vector.<name>.weight``)
        assert selected == sorted(theirs_selected)
    inner = adapter_key_prefixes(ours.base_model.model)
    assert inner and inner <= _get_tuner_state_dict_key_prefixes(theirs.base_model.model)
    assert not any(p.startswith("base_model") for p in inner)


def test_filter_respects_dot_boundaries() -> None:
    state = {"a": 0, "a.b": 1, "a.b.c": 2, "a.bc": 3, "ab": 4, "x.a.b": 5, "b.c": 6}
    assert filter_state_dict_by_key_prefixes(state, {"a.b"}) == {"a.b": 1, "a.b.c": 2}
    assert filter_state_dict_by_key_prefixes(state, {"a.b", "b.c"}) == {"a.b": 1, "a.b.c": 2, "b.c": 6}
    assert filter_state_dict_by_key_prefixes(state, set()) == {}
