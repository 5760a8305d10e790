"""The contract every registered method keeps, on every layer type it supports: a tiny model per layer type
(``MODEL_KINDS`` in conftest.py: Linear MLP, Conv2d, ViT, Conv1d, Conv3d, grouped conv, transformers Conv1D,
Embedding, MultiheadAttention), so a new method or layer type is covered by registering it or adding a line.

For each (method, model): the output at init equals the base; only adapter and ``modules_to_save``
tensors train; merge → unmerge restores W; merged logits equal unmerged; merging twice is a no-op;
``disable_adapter()`` gives the base output; ``unload``/``merge_and_unload`` restore the module types;
save → load gives the same logits and save → load → save the same files; several named adapters can be
added, switched, saved, loaded and deleted.

LoRA with each non-default initialiser (``LORA_INITS``: PiSSA, OLoRA, orthogonal, LoftQ, EVA, CorDA) runs on the
MLP through the tests that hold on a rewritten base weight (``INIT_CASES``: training, merging, save/load,
copies); its output at creation and its conversion back to plain LoRA are tests/test_lora_init*.py's.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re
from typing import Any

import pytest
import torch
from conftest import (
    LORA_INITS,
    MODEL_KINDS,
    ModelKind,
    adapted_model,
    adapter_layers,
    logits,
    make_config,
    max_abs_diff,
    perturb_modules_to_save,
    prepared_base,
    read_adapter,
    supports,
)
from torch import nn

import deltatune
from deltatune import PeftModel, get_peft_model
from deltatune.layers import AdapterLayer
from deltatune.modules_to_save import ModulesToSaveWrapper

ATOL = 1e-5


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the output scale (AdaLoRA's N(0, 1) init gives logits ~1e3)."""
    return max_abs_diff(a, b) / max(1.0, float(b.abs().max()))


def _cases() -> list[Any]:
    """Every registered method on every model kind whose layer type it supports (``MODEL_KINDS`` holds one
    kind per layer type), plus the CP form of conv kernels where the method has one."""
    cases = []
    for method in deltatune.available_methods():
        fields = {f.name for f in dataclasses.fields(deltatune.get_method(method).config_cls)}
        for kind in MODEL_KINDS:
            if supports(method, kind):
                cases.append(pytest.param(method, kind, {}, id=f"{method}-{kind}"))
        if "use_effective_conv2d" in fields:
            for kind in ("conv", "conv1d"):
                if supports(method, kind):
                    extra = {"use_effective_conv2d": True}
                    cases.append(pytest.param(method, kind, extra, id=f"{method}-{kind}-effective"))
    return cases


CASES = _cases()
#: LoRA with each non-default initialiser (and the options it needs), on the MLP.
INIT_CASES = [
    pytest.param("lora", "mlp", {"init_lora_weights": init, **options}, id=f"lora-mlp-{init}")
    for init, options in LORA_INITS.items()
]


def _build(
    method: str, kind_name: str, extra: dict[str, Any], nonzero: bool = True, seed: int = 0
) -> tuple[ModelKind, nn.Module, PeftModel]:
    """(kind, the untouched base model, an adapted copy built from the same seed)."""
    kind = MODEL_KINDS[kind_name]
    base = kind.build(seed)
    config = make_config(method, kind.targets, kind.modules_to_save, nonzero=nonzero, **extra)
    model = adapted_model(kind, config, seed)
    if nonzero:
        perturb_modules_to_save(model)
        if "init_lora_weights" in extra:  # EVA starts with B = 0: make every ΔW non-zero
            gen = torch.Generator().manual_seed(seed + 4)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".lora_B." in name:
                        p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return kind, base, model


def _base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: layer.base_weight.detach().clone() for n, layer in adapter_layers(model)}


@pytest.mark.parametrize(("method", "kind_name", "extra"), CASES)
def test_output_at_init_equals_base(method: str, kind_name: str, extra: dict[str, Any]) -> None:
    kind, base, model = _build(method, kind_name, extra, nonzero=False)
    x = kind.inputs()
    assert len(adapter_layers(model)) >= 2
    torch.testing.assert_close(logits(model, x), logits(base, x), atol=0.0, rtol=0.0)


@pytest.mark.parametrize(("method", "kind_name", "extra"), CASES + INIT_CASES)
def test_only_adapter_and_modules_to_save_train(method: str, kind_name: str, extra: dict[str, Any]) -> None:
    kind, _, model = _build(method, kind_name, extra)
    adapter_attrs = deltatune.get_method(method).adapter_param_names()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = set()
    for name, _ in model.named_parameters():
        parts = name.split(".")
        is_adapter = any(
            attr in parts and parts[parts.index(attr) + 1] == "default" for attr in adapter_attrs
        )
        if is_adapter or ".modules_to_save.default." in name:
            expected.add(name)
    assert trainable == expected
    assert any(".modules_to_save.default." in n for n in trainable)
    # The base weights of targeted layers and the original head are frozen.
    base_tensor = re.compile(r"\.base_layer\.(weight|bias|in_proj_weight|in_proj_bias)$")
    assert not any(base_tensor.search(n) or ".original_module." in n for n in trainable)
    # Gradients reach every trainable tensor, and only those.
    model.train()
    out = model(kind.inputs())
    out = out.logits if hasattr(out, "logits") else out
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


@pytest.mark.parametrize(("method", "kind_name", "extra"), CASES + INIT_CASES)
def test_merge_unmerge_and_idempotent_merge(method: str, kind_name: str, extra: dict[str, Any]) -> None:
    kind, _, model = _build(method, kind_name, extra)
    x = kind.inputs()
    before = _base_weights(model)
    unmerged = logits(model, x)
    if not all(layer.mergeable for _, layer in adapter_layers(model)):  # LoRA on grouped convs, as in PEFT
        with pytest.raises(NotImplementedError, match="groups > 1"):
            model.merge_adapter()
        assert all(torch.equal(w, before[n]) for n, w in _base_weights(model).items())
        return
    model.merge_adapter()
    merged_weights = _base_weights(model)
    for name, w in merged_weights.items():
        assert max_abs_diff(w, before[name]) > 1e-4, f"{name}: merge did not change W (ΔW is zero?)"
    merged = logits(model, x)
    assert rel_diff(merged, unmerged) < ATOL
    # Merging again changes nothing.
    model.merge_adapter()
    for name, layer in adapter_layers(model):
        assert layer.merged_adapters == ["default"]
        torch.testing.assert_close(layer.base_weight, merged_weights[name], atol=0.0, rtol=0.0)
    torch.testing.assert_close(logits(model, x), merged, atol=0.0, rtol=0.0)
    model.unmerge_adapter()
    layers = dict(adapter_layers(model))
    for name, w in _base_weights(model).items():
        # float32 W + ΔW − ΔW is exact up to rounding at the scale of the merged weight; a factor divided out
        # again (exact_unmerge False: IA³, whose unmerge PEFT also calls inaccurate) loses more.
        scale = max(1.0, float(merged_weights[name].abs().max()))
        tolerance = 2e-7 if layers[name].exact_unmerge else 1e-5
        torch.testing.assert_close(w, before[name], atol=tolerance * scale, rtol=0.0)
    assert not any(layer.merged for _, layer in adapter_layers(model))
    assert rel_diff(logits(model, x), unmerged) < ATOL


@pytest.mark.parametrize(("method", "kind_name", "extra"), CASES)
def test_disable_adapter_equals_base(method: str, kind_name: str, extra: dict[str, Any]) -> None:
    kind, base, model = _build(method, kind_name, extra)
    x = kind.inputs()
    expected = logits(base, x)
    adapted = logits(model, x)
    assert max_abs_diff(adapted, expected) > 1e-4
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, x), expected, atol=0.0, rtol=0.0)
    assert max_abs_diff(logits(model, x), adapted) == 0.0
    # Disabling a merged model unmerges it first (PEFT semantics), so it still equals the base.
    if not all(layer.mergeable for _, layer in adapter_layers(model)):
        return
    model.merge_adapter()
    with model.disable_adapter():
        assert rel_diff(logits(model, x), expected) < ATOL
    assert rel_diff(logits(model, x), adapted) < ATOL


@pytest.mark.parametrize(("method", "kind_name", "extra"), CASES)
def test_unload_and_merge_and_unload_restore_types(
    method: str, kind_name: str, extra: dict[str, Any]
) -> None:
    kind, base, model = _build(method, kind_name, extra)
    x = kind.inputs()
    types = {n: type(m) for n, m in base.named_modules()}
    adapted = logits(model, x)

    plain = model.unload()
    assert {n: type(m) for n, m in plain.named_modules()} == types
    assert not any(isinstance(m, AdapterLayer | ModulesToSaveWrapper) for m in plain.modules())
    for (name, p), (_, q) in zip(plain.state_dict().items(), base.state_dict().items(), strict=True):
        if not any(name.startswith(e) for e in kind.modules_to_save):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0.0, msg=name)

    _, _, model = _build(method, kind_name, extra)
    if not all(layer.mergeable for _, layer in adapter_layers(model)):
        with pytest.raises(NotImplementedError):
            model.merge_and_unload(safe_merge=True)
        return
    merged = model.merge_and_unload(safe_merge=True)
    assert {n: type(m) for n, m in merged.named_modules()} == types
    assert rel_diff(logits(merged, x), adapted) < ATOL


@pytest.mark.parametrize(("method", "kind_name", "extra"), CASES + INIT_CASES)
def test_save_load_round_trip(method: str, kind_name: str, extra: dict[str, Any], tmp_path: Any) -> None:
    kind, _, model = _build(method, kind_name, extra)
    x = kind.inputs()
    adapted = logits(model, x)
    model.save_pretrained(tmp_path / "a")
    config, tensors = read_adapter(tmp_path / "a")
    assert config["peft_type"] == deltatune.get_method(method).peft_type
    assert config["inference_mode"] is True
    assert all(k.startswith("base_model.model.") and ".default" not in k for k in tensors)

    # PiSSA, OLoRA and LoftQ decompose the base again on loading; CorDA's base is preprocessed (same data).
    loaded = PeftModel.from_pretrained(prepared_base(kind, model.peft_config["default"]), tmp_path / "a")
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not loaded.training
    torch.testing.assert_close(logits(loaded, x), adapted, atol=0.0, rtol=0.0)

    loaded.save_pretrained(tmp_path / "b")
    config_b, tensors_b = read_adapter(tmp_path / "b")
    assert config_b == config
    assert tensors_b.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(tensors_b[key], tensor), key

    fresh = prepared_base(kind, model.peft_config["default"])
    trainable = PeftModel.from_pretrained(fresh, tmp_path / "a", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    torch.testing.assert_close(logits(trainable, x), adapted, atol=0.0, rtol=0.0)


@pytest.mark.parametrize(("method", "kind_name", "extra"), CASES)
def test_several_named_adapters(method: str, kind_name: str, extra: dict[str, Any], tmp_path: Any) -> None:
    kind, base, model = _build(method, kind_name, extra)
    x = kind.inputs()
    first = logits(model, x)
    # AdaLoRA allows one trainable adapter per model; the others load frozen (as in PEFT).
    second_kwargs: dict[str, Any] = {"inference_mode": True} if method == "adalora" else {}
    torch.manual_seed(11)
    other = make_config(method, kind.targets, kind.modules_to_save, **extra, **second_kwargs)
    model.add_adapter("other", other)
    # Added, not activated.
    assert model.active_adapter == "default"
    torch.testing.assert_close(logits(model, x), first, atol=0.0, rtol=0.0)
    assert set(model.peft_config) == {"default", "other"}

    model.set_adapter("other")
    perturb_modules_to_save(model, "other", seed=5)
    second = logits(model, x)
    assert max_abs_diff(second, first) > 1e-4
    for name, p in model.named_parameters():
        if ".default" in name:
            assert not p.requires_grad, name
        if method != "adalora" and (".other" in name):
            assert p.requires_grad, name

    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()

    fresh = PeftModel.from_pretrained(kind.build(0), tmp_path)
    torch.testing.assert_close(logits(fresh, x), first, atol=0.0, rtol=0.0)
    fresh.load_adapter(tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(logits(fresh, x), first, atol=0.0, rtol=0.0)
    fresh.set_adapter("other")
    torch.testing.assert_close(logits(fresh, x), second, atol=0.0, rtol=0.0)
    fresh.set_adapter("default")
    torch.testing.assert_close(logits(fresh, x), first, atol=0.0, rtol=0.0)

    model.delete_adapter("other")
    assert set(model.peft_config) == {"default"}
    assert model.active_adapter == "default"
    assert not any(".other" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, x), first, atol=0.0, rtol=0.0)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, x), logits(base, x), atol=0.0, rtol=0.0)


@pytest.mark.parametrize(("method", "kind_name", "extra"), CASES + INIT_CASES)
def test_deepcopy_and_pickle_keep_outputs(method: str, kind_name: str, extra: dict[str, Any]) -> None:
    kind, _, model = _build(method, kind_name, extra)
    x = kind.inputs()
    expected = logits(model, x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert isinstance(clone, PeftModel)
        torch.testing.assert_close(logits(clone, x), expected, atol=0.0, rtol=0.0)


def test_modules_to_save_wrapper_passes_attributes_through() -> None:
    _, _, model = _build("lora", "vit", {})
    wrapper = model.base_model.model.classifier
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert (wrapper.in_features, wrapper.out_features) == (32, 3)
    assert wrapper.weight is wrapper.modules_to_save["default"].weight
    with model.disable_adapter():
        assert wrapper.weight is wrapper.original_module.weight
    with pytest.raises(AttributeError):
        _ = wrapper.no_such_attribute


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.grouped(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_modules": ["conv", "grouped"], "r": 3}, "divisible by groups"),
        ({"target_modules": ["conv"], "modules_to_save": ["nonexistent"]}, "names no module"),
    ],
)
def test_failed_injection_leaves_the_model_unchanged(kwargs: dict[str, Any], message: str) -> None:
    torch.manual_seed(0)
    model = _Grouped()
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, deltatune.LoraConfig(**{"r": 2, **kwargs}))
    assert {n: type(m) for n, m in model.named_modules()} == types
    # A failing second adapter leaves the first one intact.
    peft_model = get_peft_model(model, deltatune.LoraConfig(r=2, target_modules=["conv"]))
    with pytest.raises(ValueError, match=message):
        peft_model.add_adapter("other", deltatune.LoraConfig(**{"r": 2, **kwargs}))
    layer = peft_model.base_model.model.conv
    assert layer.adapter_names == ["default"] and set(peft_model.peft_config) == {"default"}
