"""LoRA's rarer variants against the real peft: KaSA (``kasa_config``) and MiCA (``init_lora_weights="mica"``)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 12, bias=bias)
        self.lin1 = nn.Linear(12, 10, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def kasa_config(lib, **kw):  # type: ignore[no-untyped-def]
    options = {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 8, **kw}
    return lib.LoraConfig(kasa_config=lib.KasaConfig(beta=0.3, gamma=0.2), **options)


def both(config_of, base: nn.Module, seed: int = 1):  # type: ignore[no-untyped-def]
    """The same base adapted by peft and by deltatune from the same seed."""
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), config_of(peft))
    torch.manual_seed(seed)
    ours = dt.get_peft_model(copy.deepcopy(base), config_of(dt))
    return theirs, ours


def assert_same_state(theirs: nn.Module, ours: nn.Module) -> None:
    t, o = theirs.state_dict(), ours.state_dict()
    assert sorted(t) == sorted(o)
    for key in t:
        torch.testing.assert_close(o[key], t[key], atol=1e-6, rtol=0, msg=key)


def randomize_b(*models: nn.Module) -> None:
    """Gives every ``lora_B`` the same non-zero values in each model (the adapter then changes the output)."""
    gen = torch.Generator().manual_seed(5)
    states = [m.state_dict() for m in models]
    for key, value in states[0].items():
        if ".lora_B." in key:
            new = torch.randn(value.shape, generator=gen)
            for state in states:
                state[key].copy_(new)


@pytest.fixture
def base() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


def test_kasa_same_tensors_outputs_and_loss_as_peft(base: nn.Module) -> None:
    theirs, ours = both(kasa_config, base)
    assert_same_state(theirs, ours)  # A, B, lora_diag and the truncated base weights
    randomize_b(theirs, ours)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours._get_kasa_loss(), theirs._get_kasa_loss())
    torch.testing.assert_close(ours._get_kasa_loss("default"), theirs._get_kasa_loss(["default"]))


def test_kasa_truncates_the_r_smallest_singular_components(base: nn.Module) -> None:
    weight = base.lin1.weight.detach().clone()
    model = dt.get_peft_model(copy.deepcopy(base), kasa_config(dt))
    s_before = torch.linalg.svdvals(weight)
    s_after = torch.linalg.svdvals(model.base_model.model.lin1.base_layer.weight.detach())
    torch.testing.assert_close(s_after[:6], s_before[:6], atol=1e-5, rtol=0)
    assert s_after[6:].abs().max() < 1e-5


def test_kasa_cross_loads_both_ways(base: nn.Module, tmp_path: Path) -> None:
    theirs, ours = both(kasa_config, base)
    randomize_b(theirs, ours)
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = theirs(x)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    loaded_ours = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    loaded_theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    lazy = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", low_cpu_mem_usage=True)
    assert loaded_theirs.peft_config["default"].kasa_config == peft.KasaConfig(beta=0.3, gamma=0.2)
    with torch.no_grad():
        for model in (loaded_ours, loaded_theirs, lazy):
            torch.testing.assert_close(model(x), expected)


def test_kasa_merge_unmerge_and_gradients(base: nn.Module) -> None:
    model = dt.get_peft_model(copy.deepcopy(base), kasa_config(dt))
    randomize_b(model)
    x = torch.randn(3, 16)
    model(x).sum().backward()
    diag = model.base_model.model.lin0.lora_diag["default"]
    assert diag.shape == (4,) and diag.grad is not None
    with torch.no_grad():
        expected = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), expected)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_kasa_refusals() -> None:
    with pytest.raises(ValueError, match="KaSA requires `r`"):
        dt.get_peft_model(MLP(), kasa_config(dt, r=10))  # lin1 is 10 × 12
    model = dt.get_peft_model(MLP(), kasa_config(dt))
    with pytest.raises(ValueError, match="KaSA cannot be combined with adapters that don't use KaSA"):
        model.add_adapter("plain", dt.LoraConfig(target_modules=["lin0"]))
    model.add_adapter("second", kasa_config(dt))
    assert list(model.peft_config) == ["default", "second"]
    plain = dt.get_peft_model(MLP(), dt.LoraConfig(target_modules=["lin0"], r=4))
    assert plain._get_kasa_loss() == 0.0
    with pytest.raises(ValueError, match="KaSA cannot be combined"):
        plain.add_adapter("kasa", kasa_config(dt))
    with pytest.raises(TypeError, match="`kasa_config` must be a `KasaConfig`"):
        dt.LoraConfig(kasa_config=123)
    with pytest.raises(ValueError, match="`beta` must be non-negative"):
        dt.KasaConfig(beta=-1.0)
    with pytest.raises(ValueError, match="variant combination"):
        dt.LoraConfig(kasa_config=dt.KasaConfig(), use_dora=True)


def test_kasa_refuses_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(8, 12))
    with pytest.raises(ValueError, match="KaSA does not support `fan_in_fan_out=True`"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["0"], r=2, kasa_config=dt.KasaConfig()))


class EmbeddingMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(x))))


def mica_config(lib, **kw):  # type: ignore[no-untyped-def]
    return lib.LoraConfig(target_modules=["emb", "fc1", "fc2"], r=3, init_lora_weights="mica", **kw)


def trainable(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_mica_same_tensors_and_trainable_parameters_as_peft() -> None:
    torch.manual_seed(0)
    base = EmbeddingMLP()
    theirs, ours = both(mica_config, base)
    assert_same_state(theirs, ours)  # B: the minor left singular vectors (Eᵀ's for the embedding), A = 0
    assert trainable(ours) == trainable(theirs)
    assert not any(".lora_B." in n or "lora_embedding_B" in n for n in trainable(ours))
    x = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), base(x))  # A = 0: the output starts as the base's
    theirs.add_adapter("other", mica_config(peft))
    ours.add_adapter("other", mica_config(dt))
    for model in (theirs, ours):
        model.set_adapter("other")
    assert trainable(ours) == trainable(theirs)
    ours.set_adapter("default")
    ours.delete_adapter("other")
    assert "other" not in ours.base_model.model.fc1.frozen_peft_weight_names
    ours.add_adapter("plain", dt.LoraConfig(target_modules=["fc1"], r=3))
    ours.set_adapter("plain")
    assert trainable(ours) == [
        "base_model.model.fc1.lora_A.plain.weight",
        "base_model.model.fc1.lora_B.plain.weight",
    ]


def test_mica_cross_loads_and_refuses_a_too_large_rank(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = EmbeddingMLP()
    theirs, ours = both(mica_config, base)
    for model in (theirs, ours):
        for key, value in model.state_dict().items():
            if "lora_A" in key or "lora_embedding_A" in key:
                value.copy_(torch.randn(value.shape, generator=torch.Generator().manual_seed(len(key))))
    x = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    loaded = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    loaded_theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)
        torch.testing.assert_close(loaded_theirs(x), expected)
    assert not any(".lora_B." in n or "lora_embedding_B" in n for n in trainable(loaded))
    with pytest.raises(ValueError, match="MiCA requires `r` <= min"):
        dt.get_peft_model(
            nn.Sequential(nn.Linear(2, 3)), dt.LoraConfig(target_modules=["0"], init_lora_weights="mica", r=3)
        )


def test_dora_with_megatron_gets_peft_error() -> None:
    with pytest.raises(ValueError, match="DoRA does not support megatron_core"):
        dt.LoraConfig(target_modules=["fc1"], use_dora=True, megatron_config={"any": "thing"})
    with pytest.raises(ValueError, match="megatron_config is not supported"):
        dt.LoraConfig(target_modules=["fc1"], megatron_config={"any": "thing"})


class Projections(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 12)
        self.down_proj = nn.Linear(12, 8)
        self.other = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.down_proj(torch.relu(self.q_proj(x))))


def bdlora_config(lib, **kw):  # type: ignore[no-untyped-def]
    options = lib.BdLoraConfig(
        target_modules_bd_a=["q_proj"], target_modules_bd_b=["down_proj"], nblocks=2, **kw
    )
    return lib.LoraConfig(target_modules=["q_proj", "down_proj"], r=4, use_bdlora=options)


def test_bdlora_same_tensors_outputs_and_files_as_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = Projections()
    theirs, ours = both(bdlora_config, base)
    assert_same_state(theirs, ours)  # q_proj's A and down_proj's B: (out, in / 2), the blocks stacked
    assert ours.base_model.model.q_proj.lora_A["default"].weight.shape == (4, 4)
    gen = torch.Generator().manual_seed(3)
    state = ours.state_dict()
    for key, value in theirs.state_dict().items():
        if "lora_" in key:
            new = torch.randn(value.shape, generator=gen)
            value.copy_(new)
            state[key].copy_(new)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected)
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4)
        ours.unmerge_adapter()
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    loaded = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    loaded_theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)
        torch.testing.assert_close(loaded_theirs(x), expected)


def test_bdlora_refusals() -> None:
    with pytest.raises(ValueError, match="Found overlapping modules in target_modules_bd lists"):
        dt.BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["q_proj"])
    loose = dt.LoraConfig(target_modules=["q_proj"], use_bdlora={"target_modules_bd_a": ["x"], "nblocks": 2})
    with pytest.raises(ValueError, match="matches neither A nor B block-diagonal patterns"):
        dt.get_peft_model(Projections(), loose)
    odd = dt.LoraConfig(
        target_modules=["q_proj"], use_bdlora={"target_modules_bd_a": ["q_proj"], "nblocks": 3}
    )
    with pytest.raises(ValueError, match="not divisible by"):
        dt.get_peft_model(Projections(), odd)
    with pytest.raises(ValueError, match="Invalid or unsupported variant combination"):
        dt.LoraConfig(use_bdlora=dt.BdLoraConfig(), use_dora=True)
    embedding = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="use_bdlora supports Linear and Conv1D layers, not Embedding"):
        dt.get_peft_model(embedding, dt.LoraConfig(target_modules=["0"], use_bdlora=dt.BdLoraConfig()))


@pytest.fixture(scope="module")
def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def alora_config(lib):  # type: ignore[no-untyped-def]
    return lib.LoraConfig(
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj", "down_proj"],
        r=4,
        alora_invocation_tokens=[7, 8],
    )


#: Row 0 invokes at position 3, row 1 twice (the last counts), row 2 never.
INVOKED = torch.tensor([[1, 2, 3, 7, 8, 4, 5, 6], [2, 7, 8, 3, 7, 8, 9, 1], [1, 2, 3, 4, 5, 6, 9, 9]])


def test_alora_forward_and_generate_as_peft(tiny_llama: nn.Module, tmp_path: Path) -> None:
    theirs, ours = both(alora_config, tiny_llama)
    assert_same_state(theirs, ours)
    randomize_b(theirs, ours)
    with torch.no_grad():
        expected = theirs(input_ids=INVOKED).logits
        logits = ours(input_ids=INVOKED).logits
        base = tiny_llama(input_ids=INVOKED).logits
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(logits[0, :3], base[0, :3])  # the base model before the invocation
    torch.testing.assert_close(logits[2], base[2])  # and in a row without it
    assert not torch.allclose(logits[0, 3:], base[0, 3:])
    generated = ours.generate(input_ids=INVOKED, attention_mask=torch.ones_like(INVOKED), max_new_tokens=3)
    reference = theirs.generate(input_ids=INVOKED, attention_mask=torch.ones_like(INVOKED), max_new_tokens=3)
    assert generated.tolist() == reference.tolist()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    loaded = dt.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "peft")
    loaded_theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=INVOKED).logits, expected)
        torch.testing.assert_close(loaded_theirs(input_ids=INVOKED).logits, expected)


def test_alora_refusals_and_sharing_a_layer(tiny_llama: nn.Module) -> None:
    model = dt.get_peft_model(copy.deepcopy(tiny_llama), alora_config(dt))
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA"):
        model.generate(input_ids=INVOKED, max_new_tokens=2, num_beams=2)
    with pytest.warns(UserWarning, match="Cannot calculate aLoRA offsets when only inputs_embeds"):
        model(inputs_embeds=torch.randn(1, 4, 16))
    plain = dt.get_peft_model(
        copy.deepcopy(tiny_llama), dt.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])
    )
    plain.add_adapter("activated", alora_config(dt))  # the LoRA layer takes the aLoRA adapter beside its own
    layer = plain.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "ALoraLayer" and layer.adapter_names == ["default", "activated"]


def test_alora_explicit_offsets_as_peft(tiny_llama: nn.Module) -> None:
    def config(lib):  # type: ignore[no-untyped-def]
        with pytest.warns(UserWarning, match="only supported for CAUSAL_LM"):
            return lib.LoraConfig(target_modules=["q_proj"], r=4, alora_invocation_tokens=[7, 8])

    theirs, ours = both(config, tiny_llama)  # no task type: PeftModel's forward takes PEFT's alora_offsets
    randomize_b(theirs, ours)
    offsets = [5, None, 2]
    with torch.no_grad():
        expected = theirs(input_ids=INVOKED, alora_offsets=offsets).logits
        torch.testing.assert_close(ours(input_ids=INVOKED, alora_offsets=offsets).logits, expected)
        with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA"):
            ours(input_ids=INVOKED, num_beams=2)
