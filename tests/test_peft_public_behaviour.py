"""PEFT's public behaviour that PEFT's own tests check (scripts/peft_parity.py), each compared with peft 0.21.2
itself as the oracle: the warnings, exception types and the message text its tests match on, the ``OLoRA``
spelling, a ``state_dict`` set on the model deciding what ``save_pretrained`` writes, the ``modules_to_save``
wrapper's failsafe, ``check_if_peft_model`` and ``prepare_model_for_kbit_training``."""

from __future__ import annotations

import importlib
import json
import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest.mock import patch

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune

peft = pytest.importorskip("peft")

LIBS = ["deltatune", "peft"]


def lib(name: str) -> ModuleType:
    """The library under test: deltatune, or peft as the oracle (same public names)."""
    return importlib.import_module(name)


def sub(name: str, module: str) -> ModuleType:
    """``deltatune.<module>`` or ``peft.<module>``."""
    return importlib.import_module(f"{name}.{module}")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


class WithMha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)
        self.lin = nn.Linear(8, 8)


class TiedLM(nn.Module):
    """An LM whose output layer shares the input embedding's weight (``tie_word_embeddings=True``)."""

    class Config:
        tie_word_embeddings = True

        def to_dict(self) -> dict[str, Any]:
            return {"tie_word_embeddings": True}

    _tied_weights_keys = ["lm_head.weight"]  # noqa: RUF012 - transformers' class attribute, read by peft

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(12, 8)
        self.linear = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 12, bias=False)
        self.lm_head.weight = self.embed_tokens.weight
        self.config = self.Config()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "corda"])
def test_rslora_with_patterns_and_a_base_changing_init_warns(name: str, init: str) -> None:
    kwargs: dict[str, Any] = {"init_lora_weights": init, "target_modules": ["lin0"], "use_rslora": True}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib(name).LoraConfig(**kwargs, rank_pattern={"lin0": 4})
        lib(name).LoraConfig(**kwargs)  # without a pattern: no such warning
    texts = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    matching = [
        t for t in texts if t.startswith("Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern")
    ]
    assert len(matching) == 1, texts


@pytest.mark.parametrize("name", LIBS)
def test_olora_is_accepted_in_any_case(name: str) -> None:
    x = torch.randn(3, 10)
    expected = mlp()(x)
    config = lib(name).LoraConfig(init_lora_weights="OLoRA", target_modules=["lin0"])
    model = lib(name).get_peft_model(mlp(), config)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize("target_modules", [None, []])
def test_target_parameters_matching_nothing_raises_peft_message(name: str, target_modules: Any) -> None:
    config = lib(name).LoraConfig(target_modules=target_modules, target_parameters=["foobar.weight"])
    msg = (
        "No `target_modules` passed but also no `target_parameters` found. Please check the values for these"
    )
    with pytest.raises(ValueError, match=re.escape(msg + " arguments.")) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib(name).get_peft_model(mlp(), config)
    assert type(info.value).__name__ == "NoMatchingPeftModuleError"


@pytest.mark.parametrize("name", LIBS)
def test_unmatched_target_modules_beside_matched_parameters_warn(name: str) -> None:
    config = lib(name).LoraConfig(target_modules=["foobar"], target_parameters=["lin0.weight"])
    with pytest.warns(
        RuntimeWarning, match=re.escape("target_modules={'foobar'} were set but no module was matched.")
    ):
        lib(name).get_peft_model(mlp(), config)


@pytest.mark.parametrize("name", LIBS)
def test_module_and_parameter_on_one_layer_names_the_layer_type(name: str) -> None:
    config = lib(name).LoraConfig(target_modules=["lin0"], target_parameters=["lin0.weight"])
    msg = "Trying to wrap an `nn.Parameter` of layer 'lin0' of type Linear, which is not a valid target."
    with pytest.raises(ValueError, match=re.escape(msg)):
        lib(name).get_peft_model(mlp(), config)


@pytest.mark.parametrize("name", LIBS)
def test_dora_on_multihead_attention_says_so(name: str) -> None:
    config = lib(name).LoraConfig(target_modules=["mha"], use_dora=True)
    msg = "MultiheadAttention does not support DoRA (yet), please set use_dora to False"
    with pytest.raises(ValueError, match=re.escape(msg)):
        lib(name).get_peft_model(WithMha(), config)


@pytest.mark.parametrize("name", LIBS)
def test_padding_a_grouped_conv_to_an_indivisible_rank_raises(name: str) -> None:
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(4, 4, 3, groups=2))
    peft_model = lib(name).get_peft_model(model, lib(name).LoraConfig(target_modules=["conv"], r=2))
    msg = (
        "Trying to pad a Conv2d LoRA adapter with groups=2 to target rank 3, but the target rank is not divisible "
        "by 2. Please choose a target rank that is divisible by 2."
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        sub(name, "utils.hotswap").prepare_model_for_compiled_hotswap(peft_model, target_rank=3)


@pytest.mark.parametrize("name", LIBS)
def test_hotswap_names_an_unexpected_key_as_it_would_load(name: str, tmp_path: Path) -> None:
    config = lib(name).LoraConfig(target_modules=["lin0"])
    for folder in ("a", "b"):
        lib(name).get_peft_model(mlp(), config).save_pretrained(tmp_path / folder)
    file = tmp_path / "b" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.lin1.lora_A.weight"] = torch.zeros(8, 20)
    save_file(tensors, file, metadata={"format": "pt"})
    model = lib(name).PeftModel.from_pretrained(mlp(), tmp_path / "a")
    msg = "Hot swapping the adapter did not succeed, unexpected keys found: base_model.model.lin1.lora_A.default.weight"
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        sub(name, "utils.hotswap").hotswap_adapter(model, tmp_path / "b", adapter_name="default")


@pytest.mark.parametrize("name", LIBS)
def test_save_pretrained_writes_what_the_models_state_dict_holds(name: str, tmp_path: Path) -> None:
    model = lib(name).get_peft_model(mlp(), lib(name).LoraConfig(target_modules=["lin0", "lin1"]))
    state = model.state_dict()
    del state["base_model.model.lin1.lora_A.default.weight"]
    model.state_dict = lambda: state
    model.save_pretrained(tmp_path)
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == [
        "base_model.model.lin0.lora_A.weight",
        "base_model.model.lin0.lora_B.weight",
        "base_model.model.lin1.lora_B.weight",
    ]


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize("where", ["target_modules", "modules_to_save"])
def test_a_method_that_cannot_tie_warns_on_a_tied_embedding(name: str, where: str) -> None:
    kwargs = {"target_modules": ["linear", "lm_head"]} if where == "target_modules" else {}
    if where == "modules_to_save":
        kwargs = {"target_modules": ["linear"], "modules_to_save": ["embed_tokens"]}
    with pytest.warns(UserWarning, match="no implementation exists to tie the adapters"):
        lib(name).get_peft_model(TiedLM(), lib(name).LoKrConfig(**kwargs))


def test_an_untied_model_gives_no_tying_warning() -> None:
    model = TiedLM()
    model.lm_head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deltatune.get_peft_model(model, deltatune.LoKrConfig(target_modules=["linear", "lm_head"]))


@pytest.mark.parametrize("name", LIBS)
def test_modules_to_save_wrapper_with_an_unknown_active_adapter_raises(name: str) -> None:
    config = lib(name).LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"])
    model = lib(name).get_peft_model(mlp(), config)
    wrapper = model.base_model.model.lin1
    assert wrapper.weight is wrapper.modules_to_save["default"].weight
    wrapper._active_adapter = "does-not-exist"  # PEFT's attribute; its failsafe: no silent fall-back
    with pytest.raises(AttributeError, match="has no attribute 'weight'"):
        _ = model.lin1.weight


@pytest.mark.parametrize("name", LIBS)
def test_check_if_peft_model(name: str, tmp_path: Path) -> None:
    check = sub(name, "helpers").check_if_peft_model
    lib(name).get_peft_model(mlp(), lib(name).LoraConfig(target_modules=["lin0"])).save_pretrained(
        tmp_path / "ok"
    )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text(json.dumps({"foo": "bar"}), encoding="utf-8")
    assert check(tmp_path / "ok") is True
    assert check(str(tmp_path / "ok")) is True
    assert check(tmp_path / "broken") is False


def half_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).to(torch.float16)
    model.is_loaded_in_8bit = True  # type: ignore[assignment]
    return model


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize("clear", [True, False])
def test_prepare_model_for_kbit_training_casts_and_freezes(name: str, clear: bool) -> None:
    model = half_model()
    with patch("torch.cuda.is_available", return_value=True), patch("torch.cuda.empty_cache") as empty:
        out = lib(name).prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=False, auto_clear_cache=clear
        )
    assert out is model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())
    assert empty.call_count == int(clear)


class Checkpointable(nn.Module):
    """The parts of a transformers model that ``prepare_model_for_kbit_training`` uses."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.is_loaded_in_4bit = True
        self.calls: list[tuple[str, Any]] = []

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Any = None) -> None:
        self.calls.append(("checkpointing", gradient_checkpointing_kwargs))


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize("reentrant", [True, False])
def test_prepare_model_for_kbit_training_turns_checkpointing_on(name: str, reentrant: bool) -> None:
    model = Checkpointable()
    lib(name).prepare_model_for_kbit_training(
        model, gradient_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    assert model.calls == [("checkpointing", {"use_reentrant": reentrant})]
    # reentrant checkpointing needs a grad path from the inputs: the embedding's output requires grad
    assert model.embed(torch.tensor([1, 2])).requires_grad is reentrant


class WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.linear = nn.Linear(4, 4)


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize("option", ["modules_to_save", "trainable_token_indices"])
def test_an_auxiliary_entry_equal_to_the_adapter_name_is_refused(name: str, option: str) -> None:
    """README, "Where deltatune differs on purpose": both refuse it; deltatune because no module of the model
    has that name (it never looks inside adapter layers), peft because it would wrap its own adapter module."""
    if option == "modules_to_save":
        model, config = mlp(), lib(name).LoraConfig(target_modules=["lin0"], modules_to_save=["foobar"])
    else:
        model = WithEmbedding()
        config = lib(name).LoraConfig(target_modules=["embed"], trainable_token_indices={"foobar": [1, 2]})
    with pytest.raises(ValueError) as info:
        lib(name).get_peft_model(model, config, adapter_name="foobar")
    expected = "names" if name == "deltatune" else "You are trying to target a module with"
    assert expected in str(info.value)


class WithEmbeddingAndLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin0 = nn.Linear(4, 4)
        self.lin1 = nn.Linear(4, 4)


@pytest.mark.parametrize("name", LIBS)
def test_targeted_parameter_names(name: str) -> None:
    config = lib(name).LoraConfig(target_parameters=["lin0.weight", "lin1.weight"])
    model = lib(name).get_peft_model(WithEmbeddingAndLinears(), config)
    assert model.targeted_parameter_names == ["lin0.weight", "lin1.weight"]


@pytest.mark.parametrize("name", LIBS)
def test_the_trainable_tokens_wrapper_sets_its_adapter(name: str) -> None:
    config = lib(name).LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [0, 1, 2]})
    model = lib(name).get_peft_model(WithEmbeddingAndLinears(), config)
    model.add_adapter("other", config)
    assert model.get_model_status().active_adapters == ["default"]
    model.emb.set_adapter("other")
    assert model.get_model_status().active_adapters == "irregular"
