"""The PEFT API as a ported script uses it, compared with peft on the same tiny model (the u-lib tester's
findings): what ``save_pretrained`` writes for a selection of adapters, ..."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_llama, tiny_vit
from tokenizers import Tokenizer, models
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import deltatune as dt
import deltatune.functional

peft = pytest.importorskip("peft")
pytest.importorskip("peft.functional")


@pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])
def test_save_pretrained_with_no_selected_adapters_saves_none(library: object, tmp_path: Path) -> None:
    model = library.get_peft_model(tiny_vit(), library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # type: ignore[attr-defined]
    model.add_adapter("other", library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # type: ignore[attr-defined]
    model.save_pretrained(tmp_path / "none", selected_adapters=[])
    assert not any(p.name.startswith("adapter_") for p in (tmp_path / "none").rglob("*"))
    model.save_pretrained(tmp_path / "one", selected_adapters=["other"])
    assert (tmp_path / "one" / "other" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "one" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])
def test_checkpointing_on_before_wrapping_still_trains_the_adapters(library: object) -> None:
    """Reentrant checkpointing with a frozen patch embedding: without inputs that require grad, nothing inside a
    checkpointed block gets a gradient, so only the head would train (silently)."""
    model = tiny_vit()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    config = library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])  # type: ignore[attr-defined]
    wrapped = library.get_peft_model(model, config)  # type: ignore[attr-defined]
    wrapped.train()
    labels = torch.tensor([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # torch's "None of the inputs have requires_grad" is the failure itself
        wrapped(pixel_values=torch.randn(2, 3, 32, 32), labels=labels).loss.backward()
    lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    assert len(lora) == 8
    assert all(p.grad is not None for p in lora)
    assert all(
        p.grad.abs().sum() > 0 for n, p in wrapped.named_parameters() if "lora_B" in n
    )  # A's: B is zero


def _two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])
@pytest.mark.parametrize("second_target", ["0", "2"])
def test_a_second_injected_adapter_is_active_and_trainable(library: Any, second_target: str) -> None:
    """As a fresh tuner in PEFT: the adapter injected last runs (the earlier one no longer does) and trains; the
    earlier one stays trainable; the functional helpers switch back."""
    model, x = _two_layers(), torch.randn(3, 4)
    config = partial(library.LoraConfig, r=2, init_lora_weights=False)
    library.inject_adapter_in_model(config(target_modules=["0"]), model, adapter_name="first")
    with_first = model(x)
    library.inject_adapter_in_model(config(target_modules=[second_target]), model, adapter_name="second")
    assert not torch.allclose(model(x), with_first)
    grads = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(grads.values()) and any(".second." in n for n in grads)
    library.functional.set_adapter(model, "first")
    torch.testing.assert_close(model(x), with_first)
    library.functional.set_requires_grad(model, "second", requires_grad=False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".second." in n)
    library.functional.delete_adapter(model, "second", prefix="lora_")
    assert not any(".second." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(x), with_first)


@pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])
def test_cast_adapter_dtype_upcasts_half_adapter_tensors(library: Any) -> None:
    model = _two_layers().to(torch.bfloat16)
    library.inject_adapter_in_model(library.LoraConfig(r=2, target_modules=["0"]), model)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(torch.bfloat16)
    library.functional.cast_adapter_dtype(model, "default")
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}


@pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])
def test_inject_with_a_state_dict_adapts_the_modules_it_names(library: Any) -> None:
    """A checkpoint without its config: its keys say which modules hold the adapter, whatever the config says."""
    model, x = _two_layers(), torch.randn(3, 4)
    before = model(x)
    sd = {"2.lora_A.weight": torch.ones(2, 4), "2.lora_B.weight": torch.ones(2, 2)}
    with pytest.warns(RuntimeWarning, match="config"):
        library.inject_adapter_in_model(library.LoraConfig(r=2, target_modules=["0"]), model, state_dict=sd)
    assert [n for n, m in model.named_modules() if hasattr(m, "lora_A")] == ["2"]
    result = library.set_peft_model_state_dict(model, sd)
    assert not result.unexpected_keys
    assert not torch.allclose(model(x), before)


@pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])
def test_load_adapter_is_trainable_makes_the_new_adapter_trainable(library: Any, tmp_path: Path) -> None:
    """peft 0.21: the loaded adapter requires grad at once (still inactive); the active one keeps training."""
    library.get_peft_model(_two_layers(), library.LoraConfig(r=2, target_modules=["2"])).save_pretrained(
        tmp_path
    )
    model = library.get_peft_model(_two_layers(), library.LoraConfig(r=2, target_modules=["0"]))
    model.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
    assert model.active_adapters == ["default"]
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert model.get_nb_trainable_parameters() == (28, 58)
    model.load_adapter(tmp_path, adapter_name="frozen")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".frozen." in n)


def test_unload_after_merge_adapter_gives_back_the_original_weights() -> None:
    """Differs from peft on purpose (README "Where deltatune differs on purpose"): ``unload()`` never keeps a
    merge, whether or not ``merge_adapter()`` ran; peft's keeps the merged weights."""
    original = _two_layers()[0].weight.detach().clone()
    model = dt.get_peft_model(
        _two_layers(), dt.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    )
    model.merge_adapter()
    assert not torch.allclose(model.base_model.model[0].base_layer.weight, original)
    torch.testing.assert_close(model.unload()[0].weight, original)


@pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])
def test_auto_saves_the_embeddings_of_a_resized_vocabulary(library: Any, tmp_path: Path) -> None:
    """New tokens' rows are random: without the saved embeddings a reload draws others (other logits)."""
    tiny_llama().save_pretrained(tmp_path / "base")

    def resized() -> nn.Module:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        model.resize_token_embeddings(60, mean_resizing=False)
        return model

    model = library.get_peft_model(resized(), library.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="resized"):
        model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= set(saved)
    reloaded = library.PeftModel.from_pretrained(resized(), tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 55, 59]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])
def test_auto_class_resizes_the_base_to_the_tokenizer_saved_with_the_adapter(
    library: Any, tmp_path: Path
) -> None:
    """Added tokens, trained embeddings (``modules_to_save``), the tokenizer saved next to the adapter."""
    tiny_llama().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(60, mean_resizing=False)
    config = library.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"], task_type="CAUSAL_LM"
    )
    trained = library.get_peft_model(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied embeddings; "auto" saving the resized embeddings
        trained.save_pretrained(tmp_path / "adapter")
    vocab = models.WordLevel({f"w{i}": i for i in range(60)}, unk_token="w0")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(vocab), unk_token="w0").save_pretrained(
        tmp_path / "adapter"
    )
    loaded = library.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert loaded.get_input_embeddings().weight.shape[0] == 60
    ids = torch.tensor([[1, 2, 55, 59]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


@pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])
def test_ia3_add_weighted_adapter_sums_the_vectors(library: Any) -> None:
    """PEFT's ``IA3Model.add_weighted_adapter``: each layer's vector is the weighted sum of the adapters'."""
    model = library.get_peft_model(
        _two_layers(), library.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"])
    )
    model.add_adapter("b", library.IA3Config(target_modules=["0"], feedforward_modules=[]))
    layers = model.base_model.model
    with torch.no_grad():
        for i, name in ((0, "default"), (2, "default"), (0, "b")):
            vector = layers[i].ia3_l[name]
            vector.copy_(torch.linspace(0.5, 1.5 + i, vector.numel()).reshape(vector.shape))
    model.add_weighted_adapter(["default", "b"], [0.3, 0.7], "mix")
    expected0 = 0.3 * layers[0].ia3_l["default"] + 0.7 * layers[0].ia3_l["b"]
    torch.testing.assert_close(layers[0].ia3_l["mix"], expected0)
    torch.testing.assert_close(layers[2].ia3_l["mix"], 0.3 * layers[2].ia3_l["default"])
    assert model.active_adapters == ["default"]
    model.set_adapter("mix")
    assert model(torch.ones(1, 4)).shape == (1, 2)


def test_dora_full_model_state_dicts_cross_load_strictly_with_peft() -> None:
    """``torch.save(model.state_dict())``-style checkpoints: peft's key for a magnitude
    (``…lora_magnitude_vector.default.weight``) both ways, and deltatune's earlier key still loads."""

    def make(library: Any) -> nn.Module:
        model = _two_layers()
        return library.get_peft_model(model, library.LoraConfig(r=2, target_modules=["0"], use_dora=True))

    theirs, ours, x = make(peft), make(dt), torch.randn(3, 4)
    with torch.no_grad():
        theirs.base_model.model[0].lora_magnitude_vector["default"].weight.mul_(2.0)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x))
    with torch.no_grad():
        ours.base_model.model[0].lora_magnitude_vector["default"].mul_(0.5)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(theirs(x), ours(x))
    earlier = {
        k.removesuffix("magnitude_vector.default.weight") + "magnitude_vector.default"
        if "magnitude" in k
        else k: v
        for k, v in theirs.state_dict().items()
    }
    fresh = make(dt)
    assert not fresh.load_state_dict(earlier).missing_keys
    torch.testing.assert_close(fresh(x), ours(x))
    fresh = make(dt)
    result = fresh.load_state_dict({k: v for k, v in earlier.items() if "magnitude" not in k}, strict=False)
    assert result.missing_keys == ["base_model.model.0.lora_magnitude_vector.default.weight"]
