"""PEFT's type names and small top-level helpers, compared with peft: ``PeftType``,
``PEFT_TYPE_TO_CONFIG_MAPPING``, ``get_peft_config``, ``cast_mixed_precision_params``, ``LoHaModel`` and
``LoKrModel``."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import ClassVar

import peft
import pytest
import torch
from torch import nn

import deltatune
from deltatune import registry

SUPPORTED = ["LORA", "ADALORA", "IA3", "LOHA", "LOKR", "TRAINABLE_TOKENS"]


def test_peft_type_members_are_peft_s_values() -> None:
    assert sorted(deltatune.PeftType) == sorted(SUPPORTED)
    for name in SUPPORTED:
        ours, theirs = getattr(deltatune.PeftType, name), getattr(peft.PeftType, name)
        assert ours == theirs and ours.value == theirs.value == name
        assert deltatune.PeftType(name) == ours and name in deltatune.PeftType
    assert deltatune.LoraConfig(r=2, target_modules=["q"]).peft_type == deltatune.PeftType.LORA
    assert "PROMPT_TUNING" not in deltatune.PeftType and 3 not in deltatune.PeftType
    with pytest.raises(
        AttributeError, match="PeftType has no member 'PROMPT_TUNING'; deltatune supports: LORA"
    ):
        _ = deltatune.PeftType.PROMPT_TUNING
    with pytest.raises(ValueError, match="'VERA' is not a valid PeftType; deltatune supports: LORA, ADALORA"):
        deltatune.PeftType("VERA")


def test_a_method_registered_later_is_a_peft_type_with_its_config(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass
    class ToyConfig(deltatune.LoraConfig):
        PEFT_TYPE: ClassVar[str] = "TOY"

    registry.load_methods()
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # restored after the test
    assert "TOY" not in deltatune.PeftType
    registry.register_method(
        registry.MethodSpec(
            name="toy", config_cls=ToyConfig, layer="deltatune.methods._lora_layer:LoraLayer", prefix="toy_"
        )
    )
    assert deltatune.PeftType.TOY == "TOY" and "TOY" in deltatune.PEFT_TYPE_TO_CONFIG_MAPPING
    assert deltatune.PEFT_TYPE_TO_CONFIG_MAPPING["TOY"] is ToyConfig


def test_peft_type_to_config_mapping_names_peft_s_classes() -> None:
    mapping = deltatune.PEFT_TYPE_TO_CONFIG_MAPPING
    assert list(mapping) == list(deltatune.PeftType) and len(mapping) == len(SUPPORTED)
    for name in SUPPORTED:
        assert mapping[name].__name__ == peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType(name)].__name__
    assert mapping[deltatune.PeftType.LOKR] is deltatune.LoKrConfig
    assert "VERA" not in mapping
    with pytest.raises(KeyError, match="'VERA': not a peft_type deltatune supports"):
        mapping["VERA"]


@pytest.mark.parametrize(
    "config",
    [
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], lora_dropout=0.1, use_dora=True),
        peft.LoHaConfig(r=4, alpha=8, target_modules=["q"], module_dropout=0.1),
        peft.LoKrConfig(r=4, alpha=8, target_modules=["q"], decompose_both=True),
        peft.IA3Config(target_modules=["k", "fc2"], feedforward_modules=["fc2"]),
        peft.AdaLoraConfig(init_r=8, target_r=4, total_step=100, target_modules=["q"]),
    ],
    ids=lambda c: type(c).__name__,
)
def test_get_peft_config_builds_the_config_peft_builds_from_the_same_dict(config: peft.PeftConfig) -> None:
    data = config.to_dict()  # peft_type and task_type are peft's string Enum members here
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the types match
        ours = deltatune.get_peft_config(data)
    theirs = peft.get_peft_config(data)
    assert type(ours).__name__ == type(theirs).__name__
    ours_dict = ours.to_dict()
    for key, value in theirs.to_dict().items():
        if key in ours_dict:
            got = ours_dict[key]
            same = sorted(got) == sorted(value) if isinstance(value, set | list) else got == value
            assert same, (key, got, value)
    with pytest.raises(ValueError, match="peft_type"):
        deltatune.get_peft_config({"r": 4})


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def test_cast_mixed_precision_params_casts_as_peft_does() -> None:
    base = _tiny()
    ours = deltatune.get_peft_model(copy.deepcopy(base), deltatune.LoraConfig(r=2, target_modules=["0", "2"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0", "2"]))
    deltatune.cast_mixed_precision_params(ours, torch.bfloat16)
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    got = {n: p.dtype for n, p in ours.named_parameters()}
    want = {n: p.dtype for n, p in theirs.named_parameters()}
    assert got == want and torch.bfloat16 in got.values() and torch.float32 in got.values()
    quantised = nn.Linear(2, 2)
    quantised.weight = nn.Parameter(torch.ones(2, 2, dtype=torch.int8), requires_grad=False)
    deltatune.cast_mixed_precision_params(quantised, torch.float16)
    assert quantised.weight.dtype == torch.int8 and quantised.bias.dtype == torch.float32
    with pytest.raises(ValueError, match="needs a floating-point dtype"):
        deltatune.cast_mixed_precision_params(quantised, torch.int8)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_loha_and_lokr_have_peft_s_tuner_classes(method: str) -> None:
    tuner = deltatune.LoHaModel if method == "loha" else deltatune.LoKrModel
    config_cls = deltatune.LoHaConfig if method == "loha" else deltatune.LoKrConfig
    config = config_cls(r=2, target_modules=["0"], init_weights=False)
    wrapped = deltatune.get_peft_model(_tiny(), config)
    assert type(wrapped.base_model) is tuner
    torch.manual_seed(1)
    direct = tuner(_tiny(), config_cls(r=2, target_modules=["0"], init_weights=False), "default")
    direct.load_state_dict(wrapped.base_model.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(direct(x), wrapped(x))
