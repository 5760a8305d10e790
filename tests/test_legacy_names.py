"""Target matching and transformers 4.x names on a transformers 5 ViT.

transformers 5 calls ViT's attention projections ``vit.layers.N.attention.q_proj``/``v_proj``; 4.x
called them ``vit.encoder.layer.N.attention.attention.query``/``value``. Both spellings must work in
``target_modules``, ``exclude_modules``, ``rank_pattern``/``alpha_pattern`` and ``layers_to_transform``,
and adapters saved against the old names must load with identical logits.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODEL_KINDS, adapter_layers, logits, make_config, perturb_modules_to_save, read_adapter
from safetensors.torch import save_file

import deltatune
from deltatune import LoraConfig, PeftModel, get_peft_model

VIT = MODEL_KINDS["vit"]
ALL_QV = {f"vit.layers.{i}.attention.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}


def to_legacy(key: str) -> str:
    """transformers 5 → 4.x spelling of a ViT attention key."""
    key = re.sub(
        r"vit\.layers\.(\d+)\.attention\.q_proj", r"vit.encoder.layer.\1.attention.attention.query", key
    )
    return re.sub(
        r"vit\.layers\.(\d+)\.attention\.v_proj", r"vit.encoder.layer.\1.attention.attention.value", key
    )


def targeted(model: Any) -> set[str]:
    return {name for name, _ in adapter_layers(model.base_model.model)}


def rewrite_as_legacy(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Rewrites a saved adapter as a transformers 4.x-era one: old key names and old target names."""
    legacy = {to_legacy(k): v.contiguous() for k, v in tensors.items()}
    assert any("encoder.layer.0.attention.attention.query" in k for k in legacy)
    save_file(legacy, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {**config, "target_modules": ["query", "value"]}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


@pytest.mark.parametrize("method", deltatune.available_methods())
def test_adapter_saved_with_legacy_names_loads(method: str, tmp_path: Path) -> None:
    x = VIT.inputs()
    model = get_peft_model(VIT.build(0), make_config(method, ["q_proj", "v_proj"], ["classifier"]))
    perturb_modules_to_save(model)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    config, tensors = read_adapter(tmp_path)
    rewrite_as_legacy(tmp_path, tensors, config)

    loaded = PeftModel.from_pretrained(VIT.build(0), tmp_path)
    assert targeted(loaded) == ALL_QV
    torch.testing.assert_close(logits(loaded, x), expected, atol=0.0, rtol=0.0)


def test_pruned_adalora_with_legacy_rank_pattern_loads(tmp_path: Path) -> None:
    """An AdaLoRA adapter whose rank_pattern keys and tensors use 4.x names, with one module at rank 0."""
    x = VIT.inputs()
    model = get_peft_model(VIT.build(0), make_config("adalora", ["q_proj", "v_proj"], ["classifier"]))
    keep = {
        "vit.layers.0.attention.q_proj": [True, False, True, False, False, True],
        "vit.layers.0.attention.v_proj": [False] * 6,
        "vit.layers.1.attention.q_proj": [True] * 6,
        "vit.layers.1.attention.v_proj": [False, False, False, False, False, True],
    }
    with torch.no_grad():
        for name, layer in adapter_layers(model.base_model.model):
            layer.lora_E["default"].mul_(torch.tensor(keep[name], dtype=torch.float32).view(-1, 1))
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    config, tensors = read_adapter(tmp_path)
    for name, mask in keep.items():
        m = torch.tensor(mask)
        prefix = f"base_model.model.{name}."
        tensors[prefix + "lora_A"] = tensors[prefix + "lora_A"][m]
        tensors[prefix + "lora_E"] = tensors[prefix + "lora_E"][m]
        tensors[prefix + "lora_B"] = tensors[prefix + "lora_B"][:, m]
    config["rank_pattern"] = {to_legacy(name) + ".lora_E": mask for name, mask in keep.items()}
    rewrite_as_legacy(tmp_path, tensors, config)

    loaded = PeftModel.from_pretrained(VIT.build(0), tmp_path)
    ranks = {name: layer.r["default"] for name, layer in adapter_layers(loaded.base_model.model)}
    assert ranks == {name: sum(mask) for name, mask in keep.items()}
    torch.testing.assert_close(logits(loaded, x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "targets",
    [
        ["query", "value"],
        ["q_proj", "v_proj"],
        ["attention.q_proj", "attention.attention.value"],
        sorted(ALL_QV),
        [to_legacy(n) for n in sorted(ALL_QV)],
        r"vit\.layers\.\d+\.attention\.(q_proj|v_proj)",
        r".*attention\.attention\.(query|value)",
    ],
    ids=["legacy", "modern", "mixed-suffix", "full-modern", "full-legacy", "regex-modern", "regex-legacy"],
)
def test_target_spellings_select_the_same_modules(targets: list[str] | str) -> None:
    model = get_peft_model(VIT.build(0), LoraConfig(r=2, target_modules=targets))
    assert targeted(model) == ALL_QV


def test_legacy_match_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="deltatune"):
        get_peft_model(VIT.build(0), LoraConfig(r=2, target_modules=["query", "value"]))
    messages = [r.getMessage() for r in caplog.records if "4.x" in r.getMessage()]
    assert len(messages) == 1
    assert "4 modules" in messages[0] and "q_proj" in messages[0]


def test_regex_is_a_full_match() -> None:
    # "q_proj" alone matches no full name as a regex (PEFT's re.fullmatch rule).
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(VIT.build(0), LoraConfig(r=2, target_modules="q_proj"))


@pytest.mark.parametrize(
    ("layers", "pattern"),
    [(1, None), ([1], "layers"), ([1], "layer"), ([0, 1], None)],
)
def test_layers_to_transform(layers: int | list[int], pattern: str | None) -> None:
    config = LoraConfig(
        r=2, target_modules=["query", "value"], layers_to_transform=layers, layers_pattern=pattern
    )
    wanted = [layers] if isinstance(layers, int) else layers
    expected = {n for n in ALL_QV if int(n.split(".")[2]) in wanted}
    assert targeted(get_peft_model(VIT.build(0), config)) == expected


@pytest.mark.parametrize(
    "exclude",
    [["key"], ["k_proj"], ["vit.layers.0.attention.k_proj", "vit.layers.1.attention.k_proj"], r".*\.k_proj"],
    ids=["legacy", "modern", "full", "regex"],
)
def test_exclude_modules(exclude: list[str] | str) -> None:
    config = LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=exclude)
    assert targeted(get_peft_model(VIT.build(0), config)) == ALL_QV


def test_rank_and_alpha_patterns_accept_both_spellings() -> None:
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        rank_pattern={"value": 2, "layers.1.attention.q_proj": 6},
        alpha_pattern={"encoder.layer.0.attention.attention.query": 3},
    )
    model = get_peft_model(VIT.build(0), config)
    layers = dict(adapter_layers(model.base_model.model))
    ranks = {n: layers[n].r["default"] for n in sorted(layers)}
    assert ranks == {
        "vit.layers.0.attention.q_proj": 4,
        "vit.layers.0.attention.v_proj": 2,
        "vit.layers.1.attention.q_proj": 6,
        "vit.layers.1.attention.v_proj": 2,
    }
    assert layers["vit.layers.0.attention.q_proj"].scaling["default"] == pytest.approx(3 / 4)
    assert layers["vit.layers.0.attention.v_proj"].scaling["default"] == pytest.approx(8 / 2)
    assert layers["vit.layers.1.attention.q_proj"].lora_A["default"].weight.shape == (6, 32)


def test_all_linear_matches_peft() -> None:
    peft = pytest.importorskip("peft")
    model = get_peft_model(VIT.build(0), LoraConfig(r=2, target_modules="all-linear"))
    ours = targeted(model)
    theirs_model = peft.get_peft_model(VIT.build(0), peft.LoraConfig(r=2, target_modules="all-linear"))
    theirs = {n for n, m in theirs_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert ours == theirs
    assert {"vit.layers.0.mlp.fc1", "vit.layers.1.attention.o_proj"} <= ours
    # A second all-linear adapter goes into the same (already wrapped) layers.
    model.add_adapter("other", LoraConfig(r=3, target_modules="all-linear"))
    assert all("other" in layer.r for _, layer in adapter_layers(model.base_model.model))


def test_no_match_error_names_what_exists() -> None:
    with pytest.raises(ValueError, match="matched no module") as info:
        get_peft_model(VIT.build(0), LoraConfig(r=2, target_modules=["qeury"]))
    assert "query" in str(info.value) or "q_proj" in str(info.value)


def test_model_config_dict_reads_every_kind_of_config() -> None:
    import dataclasses

    from torch import nn
    from transformers import GPT2Config

    from deltatune.names import model_config_dict
    from deltatune.tuner import AdapterModel

    @dataclasses.dataclass
    class Plain:
        model_type: str = "mine"

    def with_config(config: object) -> nn.Module:
        module = nn.Linear(2, 2)
        module.config = config  # type: ignore[assignment]
        return module

    assert model_config_dict(with_config(GPT2Config(n_layer=1)))["model_type"] == "gpt2"
    assert model_config_dict(with_config({"model_type": "dict"})) == {"model_type": "dict"}
    assert model_config_dict(with_config(Plain())) == {"model_type": "mine"}
    assert model_config_dict(with_config(Plain)) == {}  # a class, not a config
    assert model_config_dict(nn.Linear(2, 2)) == {}
    assert AdapterModel.get_model_config(with_config({"model_type": "dict"})) == {"model_type": "dict"}
