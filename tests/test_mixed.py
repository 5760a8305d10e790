"""Adapters of different types in one model (issue 17, item 5), peft as the oracle.

``get_peft_model(..., mixed=True)`` / :class:`deltatune.PeftMixedModel`: LoRA, DoRA, LoHa, LoKr and AdaLoRA
adapters side by side, nested where they share a module (PEFT's state-dict layout), several active at once;
outputs, merged models and greedy generation equal peft's mixed model on the same weights; adapters saved by
either library load into either mixed model. And a LoRA and a DoRA adapter in one ordinary ``PeftModel``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftMixedModel, get_peft_model

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


#: name → (config in either library, targets): overlapping targets, so layers nest.
CONFIGS: dict[str, Callable[[Any], Any]] = {
    "lora": lambda lib: lib.LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False),
    "loha": lambda lib: lib.LoHaConfig(r=2, target_modules=["a", "c"], init_weights=False),
    "lokr": lambda lib: lib.LoKrConfig(r=2, target_modules=["b", "c"], init_weights=False),
    "dora": lambda lib: lib.LoraConfig(
        r=2, target_modules=["a", "c"], init_lora_weights=False, use_dora=True
    ),
    "adalora": lambda lib: lib.AdaLoraConfig(
        init_r=2, target_r=2, target_modules=["b"], total_step=10, init_lora_weights=False
    ),
}
X = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _saved(tmp_path: Path, lib: Any, names: list[str]) -> Path:
    """Each adapter saved on its own by ``lib``'s PeftModel (mixed models do not save, in either library)."""
    for i, name in enumerate(names):
        torch.manual_seed(10 + i)
        model = lib.get_peft_model(MLP(), CONFIGS[name](lib))
        if name == "adalora":  # non-zero E (PEFT initialises it to zero even with init_lora_weights=False)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_E" in n:
                        p.normal_()
        model.save_pretrained(tmp_path / name)
    return tmp_path


def _mixed(lib: Any, directory: Path, names: list[str]) -> Any:
    model = lib.PeftMixedModel.from_pretrained(MLP(), directory / names[0], names[0])
    for name in names[1:]:
        model.load_adapter(directory / name, name)
    return model


@pytest.mark.parametrize("saved_by", ["peft", "deltatune"])
def test_mixed_adapters_equal_peft_mixed_model(saved_by: str, tmp_path: Path) -> None:
    names = list(CONFIGS)
    directory = _saved(tmp_path, peft if saved_by == "peft" else deltatune, names)
    theirs, ours = _mixed(peft, directory, names), _mixed(deltatune, directory, names)
    assert type(ours) is PeftMixedModel
    for active in (names, ["lora", "loha"], ["loha", "lokr", "adalora"], ["dora"], ["lokr"]):
        theirs.set_adapter(active)
        ours.set_adapter(active)
        assert ours.active_adapters == theirs.active_adapters
        with torch.no_grad():
            torch.testing.assert_close(ours(X), theirs(X), **TOL)
    # PEFT's nesting: the same state-dict keys, less DoRA's magnitude (a module with .weight in peft)
    ours_keys = {k.removesuffix(".weight") for k in ours.state_dict() if "magnitude" in k}
    assert {k for k in theirs.state_dict() if "magnitude" not in k} == {
        k for k in ours.state_dict() if "magnitude" not in k
    }
    assert ours_keys == {k.removesuffix(".weight") for k in theirs.state_dict() if "magnitude" in k}
    assert type(ours.base_model.model.a).__name__ == "DoraLayer"  # dora nests over loha over lora
    assert type(ours.base_model.model.a.next_layer).__name__ == "LoHaLayer"
    with torch.no_grad():
        ours.set_adapter(names)
        theirs.set_adapter(names)
        with ours.disable_adapter():
            torch.testing.assert_close(ours(X), MLP()(X))
        merged, merged_peft = ours.merge_and_unload(), theirs.merge_and_unload()
        assert type(merged) is MLP and not any("base_layer" in k for k in merged.state_dict())
        torch.testing.assert_close(merged(X), merged_peft(X), **TOL)


def test_get_peft_model_mixed_equals_peft_on_the_same_weights() -> None:
    def build(lib: Any) -> Any:
        model = lib.get_peft_model(MLP(), CONFIGS["lora"](lib), adapter_name="lora", mixed=True)
        model.add_adapter("loha", CONFIGS["loha"](lib))
        model.add_adapter("lokr", CONFIGS["lokr"](lib))
        model.set_adapter(["lora", "loha", "lokr"])
        return model

    theirs, ours = build(peft), build(deltatune)
    assert type(ours) is PeftMixedModel
    ours.load_state_dict(theirs.state_dict())  # the same layout, so the same weights
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    with torch.no_grad():
        expected = theirs(X)
        torch.testing.assert_close(ours(X), expected, **TOL)
        assert not torch.allclose(expected, MLP()(X), atol=1e-3)
        merged = ours.merge_and_unload()  # additive adapters: merging gives the forward's output
        torch.testing.assert_close(merged(X), expected, **TOL)


def test_mixed_generate_gives_peft_tokens() -> None:
    def llama() -> nn.Module:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
        return LlamaForCausalLM(config).eval()

    def build(lib: Any) -> Any:
        lora = lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = lib.get_peft_model(llama(), lora, adapter_name="lora", mixed=True)
        model.add_adapter(
            "loha", lib.LoHaConfig(r=2, target_modules=["q_proj", "o_proj"], init_weights=False)
        )
        model.set_adapter(["lora", "loha"])
        return model.eval()

    theirs, ours = build(peft), build(deltatune)
    ours.load_state_dict(theirs.state_dict())
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        torch.testing.assert_close(
            ours.generate(input_ids=ids, **options), theirs.generate(input_ids=ids, **options)
        )


def test_what_the_mixed_model_refuses_as_peft_does(tmp_path: Path) -> None:
    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["a"]), mixed=True)
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        model.add_adapter("ia3", IA3Config(target_modules=["a"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        get_peft_model(MLP(), IA3Config(target_modules=["a"], feedforward_modules=[]), mixed=True)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoHaConfig(r=2, target_modules=["a"]))
    with pytest.raises(ValueError, match=r"Adapter\(s\) \['nope'\] not found"):
        model.set_adapter(["default", "nope"])
    with pytest.raises(NotImplementedError, match="Saving is not supported"):
        model.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="get_layer_status is not supported"):
        model.get_layer_status()
    with pytest.raises(NotImplementedError, match="Weighted adapters"):
        model.base_model.add_weighted_adapter(["default"], [1.0], "w")


def test_delete_and_unload_in_a_mixed_model() -> None:
    model = get_peft_model(
        MLP(), LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False), mixed=True
    )
    model.add_adapter("loha", LoHaConfig(r=2, target_modules=["a"], init_weights=False))
    model.add_adapter("lokr", LoKrConfig(r=2, target_modules=["a"], init_weights=False))
    model.set_adapter(["default", "loha", "lokr"])
    model.eval()
    with torch.no_grad():
        full = model(X)
        model.set_adapter(["default", "lokr"])
        without_loha = model(X)
        model.set_adapter(["default", "loha", "lokr"])
        model.delete_adapter("loha")
        assert model.active_adapters == ["default", "lokr"] and "loha" not in model.peft_config
        torch.testing.assert_close(model(X), without_loha)
        assert not torch.allclose(full, without_loha)
        assert type(model.unload()) is MLP
        torch.testing.assert_close(model.base_model.model(X), MLP()(X))


def test_an_ordinary_peft_model_still_refuses_other_types_and_says_how() -> None:
    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["a"]))
    with pytest.raises(ValueError, match=r"mixed=True"):
        model.add_adapter("loha", LoHaConfig(r=2, target_modules=["a"]))


# ---- LoRA and DoRA in one PeftModel (PEFT allows it) --------------------------------------------------------
class EmbedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.a, self.b = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(self.emb(x))))


IDS = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("first_dora", [False, True], ids=["lora-then-dora", "dora-then-lora"])
@pytest.mark.parametrize("saved_by", ["peft", "deltatune"])
def test_lora_and_dora_in_one_model_match_peft(first_dora: bool, saved_by: str, tmp_path: Path) -> None:
    lib = peft if saved_by == "peft" else deltatune
    torch.manual_seed(1)
    first = lib.LoraConfig(
        r=2, target_modules=["emb", "a", "b"], use_dora=first_dora, init_lora_weights=False
    )
    second = lib.LoraConfig(
        r=2, target_modules=["emb", "a"], use_dora=not first_dora, init_lora_weights=False
    )
    source = lib.get_peft_model(EmbedMLP(), first)
    source.add_adapter("two", second)
    source.save_pretrained(tmp_path)
    ours = deltatune.PeftModel.from_pretrained(EmbedMLP(), tmp_path)
    ours.load_adapter(tmp_path / "two", "two")
    theirs = peft.PeftModel.from_pretrained(EmbedMLP(), tmp_path)
    theirs.load_adapter(tmp_path / "two", "two")
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "two"])
        model.eval()
    assert type(ours.base_model.model.a).__name__ == "DoraLayer"  # one layer holds both, as in PEFT
    assert {k for k in theirs.state_dict() if "magnitude" not in k} == {
        k for k in ours.state_dict() if "magnitude" not in k
    }
    with torch.no_grad():
        expected = theirs(IDS)
        torch.testing.assert_close(ours(IDS), expected, **TOL)
        ours.merge_adapter()
        torch.testing.assert_close(ours(IDS), expected, **TOL)  # a DoRA merge after a LoRA one, as PEFT
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(IDS), expected, **TOL)
        reference = copy.deepcopy(theirs).merge_and_unload()
        torch.testing.assert_close(ours.merge_and_unload()(IDS), reference(IDS), **TOL)


def test_per_row_adapters_refuse_only_dora_rows() -> None:
    model = get_peft_model(EmbedMLP(), LoraConfig(r=2, target_modules=["a"], init_lora_weights=False))
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["a"], use_dora=True, init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        rows = model(IDS, adapter_names=["default", "__base__", "default"])
        torch.testing.assert_close(rows[0], model(IDS)[0])
        with pytest.raises(ValueError, match="when DoRA is enabled"):
            model(IDS, adapter_names=["dora", "__base__", "default"])


def test_modules_to_save_in_a_mixed_model_as_peft() -> None:
    model = get_peft_model(
        MLP(), LoraConfig(r=2, target_modules=["a"], modules_to_save=["c"]), "zero", mixed=True
    )
    model.add_adapter("one", LoHaConfig(r=2, target_modules=["a"], modules_to_save=["c"]))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        model.set_adapter(["zero", "one"])
    model.add_adapter("two", LoHaConfig(r=2, target_modules=["b"], init_weights=False))
    model.set_adapter(["two"])
    original = model.base_model.model.c.original_module.weight.detach().clone()
    with torch.no_grad():
        model.base_model.model.c.modules_to_save["zero"].weight.fill_(42.0)  # not used by the active adapter
        expected = model(X)
        merged = model.merge_and_unload()
        assert isinstance(merged.c, nn.Linear) and torch.equal(merged.c.weight, original)
        torch.testing.assert_close(merged(X), expected, **TOL)


def test_deleting_merged_adapters_is_refused_and_atomic() -> None:
    model = get_peft_model(MLP(), LoraConfig(target_modules=["a"]), "zero", mixed=True)
    model.add_adapter("one", LoHaConfig(target_modules=["b"]))
    model.base_model.merge_adapter(adapter_names=["one"])
    message = "Cannot delete adapter(s) ['one'] while they are merged. Please unmerge them first."
    with pytest.raises(ValueError, match=re.escape(message)):
        model.delete_adapter(["zero", "one"])
    assert set(model.peft_config) == {"zero", "one"}
    model.delete_adapter(["zero"])
    assert set(model.peft_config) == {"one"}


def test_base_layer_is_the_adapted_module_and_next_layer_the_nested_one() -> None:
    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["a"]), mixed=True)
    plain = model.base_model.model.a.base_layer
    model.add_adapter("loha", LoHaConfig(r=2, target_modules=["a"]))
    outer = model.base_model.model.a
    assert outer.base_layer is plain and outer.get_base_layer() is plain and isinstance(plain, nn.Linear)
    assert type(outer.next_layer).__name__ == "LoraLayer" and outer.nested and not outer.next_layer.nested
