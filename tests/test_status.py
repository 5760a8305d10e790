"""``get_model_status`` / ``get_layer_status`` (functions and ``PeftModel`` methods) against peft as the oracle:
the same operations on the same tiny model give the same dataclasses, field for field, including the
``"irregular"`` values PEFT reports when layers disagree, and the same errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from conftest import MODEL_KINDS, make_config, make_peft_config

import deltatune
from deltatune import LoraConfig, get_layer_status, get_model_status, get_peft_model
from deltatune.status import TunerLayerStatus, TunerModelStatus

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _pair(method: str = "lora", kind: str = "mlp") -> tuple[Any, Any]:
    """(deltatune, peft) models with the same adapter on the same base (``modules_to_save`` included)."""
    spec = MODEL_KINDS[kind]
    ours = get_peft_model(spec.build(0), make_config(method, spec.targets, spec.modules_to_save))
    theirs = peft.get_peft_model(spec.build(0), make_peft_config(method, spec.targets, spec.modules_to_save))
    return ours, theirs


def _as_dicts(model: Any, lib: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return (
        dataclasses.asdict(lib.get_model_status(model)),
        [dataclasses.asdict(s) for s in lib.get_layer_status(model)],
    )


def _assert_same(ours: Any, theirs: Any) -> dict[str, Any]:
    """Functions and methods agree, and deltatune's report equals peft's; returns deltatune's model status."""
    mine = _as_dicts(ours, deltatune)
    assert mine == (
        dataclasses.asdict(ours.get_model_status()),
        [dataclasses.asdict(s) for s in ours.get_layer_status()],
    )
    assert mine == _as_dicts(theirs, peft)
    return mine[0]


def test_same_fields_as_peft() -> None:
    for ours, theirs in (
        (TunerModelStatus, peft.peft_model.TunerModelStatus),
        (TunerLayerStatus, peft.peft_model.TunerLayerStatus),
    ):
        assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]


@pytest.mark.parametrize(
    ("method", "kind"),
    [(m, k) for m in deltatune.available_methods() for k in ("mlp", "conv")]
    + [("lora", "embedding"), ("lora", "mha"), ("lora", "gpt2"), ("adalora", "gpt2"), ("ia3", "gpt2")],
)
def test_fresh_model_matches_peft(method: str, kind: str) -> None:
    ours, theirs = _pair(method, kind)
    status = _assert_same(ours, theirs)
    assert status["enabled"] is True and status["active_adapters"] == ["default"]


def _second_adapter(model: Any, lib: Any) -> None:
    model.add_adapter("other", lib.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))


def _layer(model: Any, name: str) -> Any:
    return model.base_model.model.get_submodule(name)


def _freeze_one_tensor(model: Any, lib: Any) -> None:
    _layer(model, "fc1").lora_A["default"].weight.requires_grad_(False)


SCENARIOS: dict[str, Callable[[Any, Any], None]] = {
    "second adapter, inactive": _second_adapter,
    "second adapter active": lambda m, lib: (_second_adapter(m, lib), m.set_adapter("other")),
    "one layer disabled": lambda m, lib: _layer(m, "fc1").enable_adapters(False),
    "one layer merged": lambda m, lib: _layer(m, "fc2").merge(),
    "all merged": lambda m, lib: m.merge_adapter(),
    "one tensor frozen": _freeze_one_tensor,
    "one layer frozen": lambda m, lib: m.base_model.model.fc2.requires_grad_(False),
    "active adapters differ": lambda m, lib: (_second_adapter(m, lib), _layer(m, "fc1").set_adapter("other")),
    "adapter frozen": lambda m, lib: m.set_requires_grad("default", False),
    "base adapter layers disabled": lambda m, lib: m.base_model.disable_adapter_layers(),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_states_match_peft(scenario: str) -> None:
    ours, theirs = _pair()
    SCENARIOS[scenario](ours, deltatune)
    SCENARIOS[scenario](theirs, peft)
    _assert_same(ours, theirs)


def test_irregular_values() -> None:
    """The summary says "irregular" exactly where layers disagree (checked on deltatune alone, values named)."""
    model, _ = _pair()
    _layer(model, "fc2").enable_adapters(False)
    _layer(model, "fc1").merge()
    _freeze_one_tensor(model, deltatune)
    status = model.get_model_status()
    assert (status.enabled, status.merged_adapters) == ("irregular", "irregular")
    assert status.requires_grad == {"default": "irregular"}
    layer = next(s for s in model.get_layer_status() if s.name == "model.fc1")
    assert layer.requires_grad == {"default": "irregular"} and layer.merged_adapters == ["default"]
    model2, _ = _pair()
    _second_adapter(model2, deltatune)
    _layer(model2, "fc1").set_adapter("other")
    assert model2.get_model_status().active_adapters == "irregular"


def test_inside_disable_adapter_matches_peft() -> None:
    ours, theirs = _pair()
    with ours.disable_adapter(), theirs.disable_adapter():
        assert _assert_same(ours, theirs)["enabled"] is False
    assert _assert_same(ours, theirs)["enabled"] is True


def test_loaded_for_inference_matches_peft(tmp_path: Any) -> None:
    ours, _ = _pair()
    ours.save_pretrained(tmp_path)
    spec = MODEL_KINDS["mlp"]
    loaded = deltatune.PeftModel.from_pretrained(spec.build(0), tmp_path)
    reference = peft.PeftModel.from_pretrained(spec.build(0), tmp_path)
    assert _assert_same(loaded, reference)["requires_grad"] == {"default": False}


def test_injected_model_and_transformers_model_match_peft() -> None:
    """Without a PeftModel: the base type is "other" for a plain module (the class name for a transformers
    model), the adapter type "None" and no peft types, as in PEFT."""
    spec = MODEL_KINDS["mlp"]
    ours = deltatune.inject_adapter_in_model(LoraConfig(r=2, target_modules=["fc1"]), spec.build(0))
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["fc1"]), spec.build(0))
    status = _as_dicts(ours, deltatune)
    assert status == _as_dicts(theirs, peft)
    assert status[0]["base_model_type"] == "other" and status[0]["adapter_model_type"] == "None"
    vit = MODEL_KINDS["vit"]
    ours = deltatune.inject_adapter_in_model(LoraConfig(r=2, target_modules=vit.targets), vit.build(0))
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=vit.targets), vit.build(0))
    assert _as_dicts(ours, deltatune) == _as_dicts(theirs, peft)
    assert deltatune.get_model_status(ours).base_model_type == "ViTForImageClassification"


@pytest.mark.parametrize("function", ["get_model_status", "get_layer_status"])
def test_model_without_adapters_raises_as_peft(function: str) -> None:
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError) as theirs:
        getattr(peft, function)(plain)
    with pytest.raises(ValueError) as ours:
        getattr(deltatune, function)(plain)
    assert str(ours.value) == str(theirs.value)


def test_exported_at_the_top_like_peft() -> None:
    assert deltatune.get_model_status is get_model_status and deltatune.get_layer_status is get_layer_status
    assert {"get_model_status", "get_layer_status"} <= set(deltatune.__all__)
