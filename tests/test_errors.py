"""Bad input gets a clear error: the type, and a message naming the problem and the valid choices."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny import tiny_vit

from deltatune import (
    AdaLoraConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
)
from deltatune.config import MissingConfigKeysError


# ---- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("factory", "fragments"),
    [
        (lambda: LoraConfig(r=0), ["r=0", "positive integer"]),
        (lambda: LoHaConfig(r=-2), ["r=-2", "positive integer"]),
        (lambda: LoraConfig(r=2.5), ["r=2.5", "positive integer"]),
        (lambda: LoraConfig(lora_alpha=-1), ["lora_alpha=-1", "[0, inf)"]),
        (lambda: LoKrConfig(alpha=-0.5), ["alpha=-0.5", "[0, inf)"]),
        (lambda: LoraConfig(lora_dropout=1.0), ["lora_dropout=1.0", "[0, 1)"]),
        (lambda: LoHaConfig(module_dropout=-0.1), ["module_dropout=-0.1", "[0, 1)"]),
        (lambda: LoKrConfig(rank_dropout=float("nan")), ["rank_dropout=nan"]),
        (lambda: LoraConfig(init_lora_weights="pisa"), ["init_lora_weights='pisa'", "'gaussian'"]),
        (lambda: LoHaConfig(init_weights="lycoris"), ["init_weights='lycoris'", "True", "False"]),
        (lambda: LoKrConfig(init_weights="xavier"), ["init_weights='xavier'", "'lycoris'"]),
        (lambda: LoraConfig(use_qalora=True), ["use_qalora", "not supported", "lora_alpha"]),
        (
            lambda: AdaLoraConfig(tinit=50, tfinal=50, total_step=100),
            ["tinit=50", "total_step - tfinal", "100 - 50"],
        ),
        (lambda: AdaLoraConfig(total_step=0), ["total_step=0", "positive integer"]),
        (lambda: AdaLoraConfig(init_r=4, target_r=8), ["target_r=8", "init_r=4"]),
        (lambda: AdaLoraConfig(beta1=1.5), ["beta1=1.5", "[0, 1)"]),
        (lambda: LoraConfig(target_modules=[1, 2]), ["target_modules", "list of strings"]),
        (lambda: LoraConfig(task_type="IMAGE"), ["task_type='IMAGE'", "SEQ_CLS"]),
        (lambda: LoraConfig(rank_pattern={"q_proj": 0}), ["rank_pattern['q_proj']=0", "positive integer"]),
        (lambda: LoraConfig(alpha_pattern={"q_proj": "big"}), ["alpha_pattern['q_proj']='big'", "number"]),
    ],
)
def test_invalid_config_values(factory, fragments):
    with pytest.raises(ValueError) as info:
        factory()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_a_target_that_modules_to_save_rules_out_is_named_as_such():
    """``--target_modules classifier`` with the head in modules_to_save: the message said the name "matched no
    module" and listed ``classifier`` as the closest name; it now says why it is not targeted."""
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_vit(), LoraConfig(target_modules=["classifier"], modules_to_save=["classifier"]))
    message = str(info.value)
    assert "'classifier': matches ['classifier'], which modules_to_save" in message, message
    assert "closest ['classifier'" not in message, message


def test_target_modules_matching_nothing_lists_closest_names():
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_vit(), LoraConfig(target_modules=["q_prj"]))
    message = str(info.value)
    assert "matched no module" in message
    assert "q_proj" in message  # the closest real name is suggested


def test_target_layer_type_the_method_cannot_adapt():
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_vit(), LoHaConfig(target_modules=["layernorm_before"]))
    message = str(info.value)
    assert "LayerNorm" in message and "supported layer types: Linear, Conv1d, Conv2d" in message


def test_modules_to_save_naming_nothing():
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_vit(), LoraConfig(target_modules=["q_proj"], modules_to_save=["clasifier"]))
    message = str(info.value)
    assert "'clasifier' names no module" in message and "classifier" in message


def test_missing_target_modules_is_explained():
    # A plain module has no model type to take PEFT's default targets from (a ViT has: see test_peft_api.py).
    with pytest.raises(ValueError, match=r"Please specify `target_modules`.*target_modules is required"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig())


def test_adalora_update_without_total_step():
    model = get_peft_model(tiny_vit(), AdaLoraConfig(target_modules=["q_proj"], init_r=4, target_r=2))
    with pytest.raises(ValueError, match="total_step is not set"):
        model.update_and_allocate(0)


# ---- files --------------------------------------------------------------------------------------
@pytest.fixture
def saved_lora(tmp_path):
    model = get_peft_model(
        tiny_vit(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path)
    return tmp_path


def test_missing_adapter_config(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        PeftModel.from_pretrained(tiny_vit(), str(tmp_path))
    assert "adapter_config.json not found" in str(info.value) and "adapter_model.safetensors" in str(
        info.value
    )


def test_malformed_json(saved_lora):
    (saved_lora / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        PeftConfig.from_pretrained(str(saved_lora))


def test_unknown_peft_type(saved_lora):
    data = json.loads((saved_lora / "adapter_config.json").read_text())
    data["peft_type"] = "PREFIX_TUNING"
    (saved_lora / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        PeftConfig.from_pretrained(str(saved_lora))
    assert "PREFIX_TUNING" in str(info.value) and "LORA" in str(info.value) and "ADALORA" in str(info.value)


def test_config_without_peft_type():
    with pytest.raises(ValueError, match="no 'peft_type'"):
        PeftConfig.from_dict({"r": 8})


def test_truncated_safetensors(saved_lora):
    path = saved_lora / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        PeftModel.from_pretrained(tiny_vit(), str(saved_lora))


def test_shape_mismatch_names_module_and_shapes(saved_lora):
    data = json.loads((saved_lora / "adapter_config.json").read_text())
    data["r"] = 8  # the file holds rank-4 tensors
    (saved_lora / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(tiny_vit(), str(saved_lora))
    message = str(info.value)
    assert "q_proj" in message or "v_proj" in message
    assert "(4, 32)" in message and "(8, 32)" in message


def test_keys_matching_nothing_strict_by_default(saved_lora):
    from safetensors.torch import load_file, save_file

    path = saved_lora / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.vit.nonexistent.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="match nothing in the model"):
        PeftModel.from_pretrained(tiny_vit(), str(saved_lora))
    loaded = PeftModel.from_pretrained(tiny_vit(), str(saved_lora), strict=False)
    assert isinstance(loaded, PeftModel)


def test_adapter_of_another_method_than_its_config(tmp_path):
    model = get_peft_model(tiny_vit(), LoHaConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    lora = LoraConfig(r=4, target_modules=["q_proj"])
    (tmp_path / "adapter_config.json").write_text(lora.to_json_string())
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(tiny_vit(), str(tmp_path))
    message = str(info.value)
    assert "LOHA" in message and "LORA" in message


@pytest.mark.parametrize(
    ("change", "kind", "start"),
    [
        ({"lora_alpha": [1]}, ValueError, "invalid adapter config (lora_alpha=[1]): "),
        ({"peft_type": "NOPE"}, ValueError, "unsupported peft_type 'NOPE'"),
        ({"r": 0}, ValueError, "r=0 must be a positive integer"),
        ({"peft_type": None}, MissingConfigKeysError, "The PeftConfig config that is trying to be loaded is"),
    ],
    ids=["wrong-type", "unknown-peft-type", "invalid-value", "no-peft-type"],
)
def test_a_broken_config_file_is_named_in_the_error(saved_lora, capsys, change, kind, start):
    """A key alone does not say which adapter is broken: the file's path ends the message, after the message
    a config built in code gives (PEFT's users match its start), in the library and in the CLI's one line."""
    from deltatune.cli import main

    path = saved_lora / "adapter_config.json"
    data = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    loads = [
        lambda: PeftConfig.from_pretrained(str(saved_lora)),
        lambda: PeftModel.from_pretrained(tiny_vit(), str(saved_lora)),
    ]
    if "peft_type" not in change:  # LoraConfig reads a file without peft_type as its own
        loads.append(lambda: LoraConfig.from_pretrained(str(saved_lora)))
    for load in loads:
        with pytest.raises(kind) as info:
            load()
        message = str(info.value)
        assert message.startswith(start) and message.endswith(f" (in {path})"), message
    assert main(["evaluate", "--adapter", str(saved_lora)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deltatune: error: {start}") and str(path) in lines[0], (
        lines
    )
