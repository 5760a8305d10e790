"""PEFT's public API beyond creating and saving one adapter: enabling and disabling layers, several active
adapters, mixed-adapter batches and ``add_weighted_adapter`` (files and state: test_peft_files.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import MODEL_KINDS, logits, make_config, max_abs_diff, supports
from torch import nn

import deltatune
from deltatune import LoraConfig, PeftModel, get_peft_model


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 20, bias=bias)
        self.head = nn.Linear(20, 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def mlp(seed: int = 0, bias: bool = True) -> MLP:
    torch.manual_seed(seed)
    return MLP(bias).eval()


X = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
RANDOM = {"init_lora_weights": False}


def two_adapters(second: dict[str, Any] | None = None) -> PeftModel:
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"], r=2, **RANDOM), "a")
    model.add_adapter(
        "b", LoraConfig(**{"target_modules": ["lin0", "lin1"], "r": 4, **RANDOM, **(second or {})})
    )
    return model.eval()


# ---- enabling, disabling, activating ------------------------------------------------------------------
def test_disable_and_enable_adapter_layers() -> None:
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"], **RANDOM))
    base, adapted = logits(mlp(), X), logits(model, X)
    model.disable_adapter_layers()
    assert torch.equal(logits(model, X), base)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    model.enable_adapter_layers()
    assert torch.equal(logits(model, X), adapted)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_disable_adapter_context_freezes_then_restores_trainability() -> None:
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(before.values())
    with model.disable_adapter():
        assert not any(p.requires_grad for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    model.disable_adapter_layers()  # a disabled model stays disabled after the context
    with model.disable_adapter():
        pass
    assert all(layer.disable_adapters for _, layer in model.base_model.adapter_layers())


def test_irregular_enabled_state_warns() -> None:
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0", "lin1"]))
    model.base_model.model.lin0.enable_adapters(False)
    with (
        pytest.warns(UserWarning, match="some adapter layers that are enabled and others"),
        model.disable_adapter(),
    ):
        pass
    assert not any(layer.disable_adapters for _, layer in model.base_model.adapter_layers())


def test_several_active_adapters_add_up() -> None:
    model = two_adapters()
    base = logits(mlp(), X)
    model.base_model.set_adapter(["a", "b"])
    both = logits(model, X)
    assert model.active_adapters == ["a", "b"] and model.base_model.active_adapter == ["a", "b"]
    assert model.base_model.model.lin1.active_adapters == ["a", "b"]  # listed even where "a" is absent
    # On the first layer the two deltas add: the merged weight of both equals the two-adapter forward.
    lin0 = model.base_model.model.lin0
    expected = lin0.base_weight + lin0.delta_weight("a") + lin0.delta_weight("b")
    hidden = torch.nn.functional.linear(X, expected, lin0.base_bias)
    out = model.base_model.model
    reference = out.head(torch.relu(out.lin1(torch.relu(hidden))))
    assert max_abs_diff(both, reference) < 1e-5 and max_abs_diff(both, base) > 1e-3
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(TypeError, match="one name"):
        model.set_adapter(["a", "b"])  # type: ignore[arg-type]


def test_several_active_adapters_cannot_share_a_modules_to_save_copy() -> None:
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"], modules_to_save=["head"]), "a")
    model.add_adapter("b", LoraConfig(target_modules=["lin1"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        model.base_model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a"]


def test_added_adapter_is_inactive_and_frozen_and_set_requires_grad() -> None:
    model = two_adapters()
    assert model.active_adapter == "a"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    model.set_requires_grad("b")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    model.set_requires_grad(["a", "b"], requires_grad=False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    model.set_adapter("b", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())


def test_deleting_the_active_adapter_activates_the_first_remaining() -> None:
    model = two_adapters()
    model.add_adapter("c", LoraConfig(target_modules=["lin0"]))
    model.set_adapter("c")
    with pytest.warns(UserWarning, match="Setting active adapter to a"):
        model.delete_adapter("c")
    assert model.active_adapters == ["a"]
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        model.delete_adapter("nope")
    with pytest.raises(ValueError, match="Adapter with name 'a' already exists"):
        model.add_adapter("a", LoraConfig(target_modules=["lin0"]))


# ---- mixed-adapter batches --------------------------------------------------------------------------
MIXED_CASES = [
    (method, kind)
    for method in deltatune.available_methods()
    for kind in ("mlp", "conv", "embedding", "gpt2")
    if method != "dora" and supports(method, kind)  # DoRA refuses mixed batches, as in PEFT
]


@pytest.mark.parametrize(("method", "kind_name"), MIXED_CASES)
def test_mixed_batch_sends_each_row_through_its_adapter(method: str, kind_name: str) -> None:
    kind = MODEL_KINDS[kind_name]
    x = torch.cat([kind.inputs(1), kind.inputs(2), kind.inputs(3)])
    targets = ["wte"] if kind_name == "embedding" else kind.targets  # position ids carry no batch dimension
    model = get_peft_model(kind.build(0), make_config(method, targets, kind.modules_to_save), "a")
    second = {"inference_mode": True} if method == "adalora" else {}
    torch.manual_seed(5)
    model.add_adapter("b", make_config(method, targets, kind.modules_to_save, **second))
    with torch.no_grad():  # the copies differ, so the head shows which adapter a row used
        model.base_model.model.head.modules_to_save["b"].weight.add_(0.5)
    model.eval()
    with model.disable_adapter():
        base = logits(model, x)
    outputs = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        outputs[name] = logits(model, x)
    rows = ["__base__", "a", "b"] * (len(x) // 3)
    with torch.no_grad():
        mixed = model(x, adapter_names=rows)
    for i, name in enumerate(rows):
        expected = base[i] if name == "__base__" else outputs[name][i]
        torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=1e-5, msg=f"row {i} ({name})")


def test_mixed_batch_errors() -> None:
    model = two_adapters()
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(X, adapter_names=["a"] * 2)
    with pytest.raises(ValueError, match=r"non-existing adapter.*nope"):
        model(X, adapter_names=["nope"] * len(X))
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(X, adapter_names=["a"] * len(X))
    model.eval()
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="merged adapters"):
        model(X, adapter_names=["a"] * len(X))
    dora = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"], use_dora=True)).eval()
    with pytest.raises(ValueError, match="DoRA is enabled"):
        dora(X, adapter_names=["default"] * len(X))
    dora(X, adapter_names=["__base__"] * len(X))  # rows that do not use the DoRA adapter are fine
    kind = MODEL_KINDS["mha"]
    mha = get_peft_model(kind.build(0), LoraConfig(target_modules=["attn"])).eval()
    with pytest.raises(TypeError, match=r"lora\.MultiheadAttention does not support mixed adapter batches"):
        mha(kind.inputs(), adapter_names=["default", "default"])


# ---- add_weighted_adapter ------------------------------------------------------------------------
def test_weighted_adapter_cat_and_svd_are_exact_linear_is_for_one_adapter() -> None:
    model = two_adapters()
    lin0 = model.base_model.model.lin0
    target = 0.7 * lin0.delta_weight("a") - 1.3 * lin0.delta_weight("b")
    model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "cat", combination_type="cat")
    model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "svd", combination_type="svd", svd_rank=6)
    model.add_weighted_adapter(["a"], [-0.5], "single", combination_type="linear")
    assert lin0.r["cat"] == 6 and lin0.r["svd"] == 6
    torch.testing.assert_close(lin0.delta_weight("cat"), target, atol=1e-5, rtol=0)
    torch.testing.assert_close(lin0.delta_weight("svd"), target, atol=1e-4, rtol=0)
    torch.testing.assert_close(lin0.delta_weight("single"), -0.5 * lin0.delta_weight("a"), atol=1e-6, rtol=0)
    assert "cat" not in model.active_adapters and not lin0.lora_A["cat"].weight.requires_grad
    # the second layer holds only "b": its part of the combination is b's alone
    lin1 = model.base_model.model.lin1
    torch.testing.assert_close(lin1.delta_weight("cat"), -1.3 * lin1.delta_weight("b"), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kind", ["ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_ties_svd"]
)
def test_weighted_adapter_merging_rules(kind: str) -> None:
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"], r=4, **RANDOM), "a")
    model.add_adapter("b", LoraConfig(target_modules=["lin0"], r=4, **RANDOM))
    torch.manual_seed(0)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type=kind, density=0.5)
    delta = model.base_model.model.lin0.delta_weight("m")
    assert torch.isfinite(delta).all() and delta.abs().sum() > 0
    model.set_adapter("m")
    assert logits(model, X).shape == (6, 2)


def test_weighted_adapter_errors_and_modules_to_save() -> None:
    model = two_adapters()
    with pytest.raises(ValueError, match="same r value"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "x", combination_type="linear")
    with pytest.raises(ValueError, match="does not exist"):
        model.add_weighted_adapter(["a", "zz"], [1.0, 1.0], "x")
    with pytest.raises(ValueError, match="density"):
        model.add_weighted_adapter(["a", "a"], [1.0, 1.0], "x", combination_type="ties")
    saved = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    saved.add_adapter("other", LoraConfig(target_modules=["lin0"]))
    with torch.no_grad():
        saved.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
    saved.add_weighted_adapter(["default", "other"], [1.0, 1.0], "merged")
    copies = saved.base_model.model.head.modules_to_save
    assert torch.equal(copies["merged"].weight, copies["default"].weight)
    saved.add_adapter("third", LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match="target the same module with modules_to_save"):
        saved.add_weighted_adapter(["default", "third"], [1.0, 1.0], "clash")
