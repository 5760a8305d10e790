"""PEFT's public API around files and state: the functional state-dict API, load results, adapter dtypes,
embeddings and model cards on save, config types and errors, default targets, and the warnings and error
types PEFT users rely on."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import logits
from layer_kinds import EmbeddingNet
from safetensors.torch import load_file
from test_peft_api import MLP, RANDOM, X, mlp, two_adapters
from torch import nn

import deltatune
from deltatune import LoraConfig, PeftModel, PeftWarning, get_peft_model


# ---- the functional API and load results ------------------------------------------------------------
def test_state_dict_functions_round_trip(tmp_path: Path) -> None:
    model = two_adapters()
    state = deltatune.get_peft_model_state_dict(model, adapter_name="b")
    model.save_pretrained(tmp_path)
    assert state.keys() == load_file(tmp_path / "b" / "adapter_model.safetensors").keys()
    fresh = get_peft_model(mlp(), LoraConfig(target_modules=["lin0", "lin1"], r=4))
    result = deltatune.set_peft_model_state_dict(fresh, state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    model.set_adapter("b")
    assert torch.equal(logits(fresh, X), logits(model, X))
    partial = {k: v for k, v in state.items() if "lin1" not in k} | {"base_model.model.nope.lora_A.weight": X}
    result = deltatune.set_peft_model_state_dict(fresh, partial)
    assert result.unexpected_keys == ["base_model.model.nope.lora_A.weight"]
    assert result.missing_keys == [
        "base_model.model.lin1.lora_A.default.weight",
        "base_model.model.lin1.lora_B.default.weight",
    ]


def test_inject_adapter_in_model_and_low_cpu_mem_usage() -> None:
    config = LoraConfig(target_modules=["lin0"], **RANDOM)
    plain = deltatune.inject_adapter_in_model(config, mlp())
    assert type(plain) is MLP and set(plain.peft_config) == {"default"}
    state = deltatune.get_peft_model_state_dict(plain)
    assert sorted(state) == ["lin0.lora_A.weight", "lin0.lora_B.weight"]
    empty = deltatune.inject_adapter_in_model(
        LoraConfig(target_modules=["lin0"]), mlp(), low_cpu_mem_usage=True
    )
    assert {p.device.type for p in empty.parameters()} == {"cpu", "meta"}
    assert deltatune.set_peft_model_state_dict(empty, state).missing_keys == []
    assert {p.device.type for p in empty.parameters()} == {"cpu"}
    assert torch.equal(empty(X), plain(X))
    base = deltatune.get_base_model_state_dict(get_peft_model(mlp(), config))
    assert base.keys() == mlp().state_dict().keys()


def test_load_adapter_result_trainability_and_dtype(tmp_path: Path) -> None:
    two_adapters().save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(mlp(), tmp_path / "b", adapter_name="b")
    result = frozen.load_adapter(tmp_path / "a", adapter_name="a")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(mlp(), tmp_path / "b", adapter_name="b", is_trainable=True)
    trainable.load_adapter(tmp_path / "a", adapter_name="a", is_trainable=True)

    def training() -> set[str]:
        return {
            n.split(".lora_")[1].split(".")[1] for n, p in trainable.named_parameters() if p.requires_grad
        }

    assert training() == {"a", "b"}  # "a" is not active, yet requires grad at once (as peft 0.21.2)
    trainable.set_adapter("a")
    assert training() == {"a"}
    half = mlp().to(torch.bfloat16)
    kept = PeftModel.from_pretrained(half, tmp_path / "b", autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if "lora_" in n} == {torch.bfloat16}


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype(autocast: bool) -> None:
    model = get_peft_model(mlp().half(), LoraConfig(target_modules=["lin0"]), autocast_adapter_dtype=autocast)
    model.add_adapter("b", LoraConfig(target_modules=["lin1"]), autocast_adapter_dtype=autocast)
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32 if autocast else torch.float16}


def test_size_mismatch_is_a_runtime_error_unless_ignored(tmp_path: Path) -> None:
    get_peft_model(EmbeddingNet(), LoraConfig(target_modules=["wte"])).save_pretrained(tmp_path)
    bigger = EmbeddingNet()
    bigger.wte = nn.Embedding(25, 8)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(bigger, tmp_path)
    with pytest.warns(UserWarning, match="size mismatch"):
        PeftModel.from_pretrained(bigger, tmp_path, ignore_mismatched_sizes=True)


# ---- save_pretrained: embeddings, model card, config ------------------------------------------------
class WithEmbeddingUtils(EmbeddingNet):
    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def get_output_embeddings(self) -> None:
        return None


def test_save_embedding_layers(tmp_path: Path) -> None:
    model = get_peft_model(WithEmbeddingUtils(), LoraConfig(target_modules=["wte", "embed_tokens"]))
    with pytest.warns(UserWarning, match="Setting `save_embedding_layers` to `True`"):
        model.save_pretrained(tmp_path / "auto")
    assert "base_model.model.wte.base_layer.weight" in load_file(
        tmp_path / "auto" / "adapter_model.safetensors"
    )
    model.save_pretrained(tmp_path / "off", save_embedding_layers=False)
    assert not any("base_layer" in k for k in load_file(tmp_path / "off" / "adapter_model.safetensors"))
    plain = get_peft_model(EmbeddingNet(), LoraConfig(target_modules=["wte"]))
    with pytest.warns(UserWarning, match="not a 🤗 transformers model"):
        plain.save_pretrained(tmp_path / "plain", save_embedding_layers=True)
    loaded = PeftModel.from_pretrained(WithEmbeddingUtils(), tmp_path / "auto")
    assert torch.equal(
        loaded.base_model.model.wte.base_layer.weight, model.base_model.model.wte.base_layer.weight
    )


def test_model_card_and_config_files(tmp_path: Path) -> None:
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"]))
    model.save_pretrained(tmp_path / "new")
    card = (tmp_path / "new" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "base_model:" not in card
    assert len(card) > 1000
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "README.md").write_text("---\nmeta: hello\n---\nMy card\n")
    model.save_pretrained(tmp_path / "kept")
    kept = (tmp_path / "kept" / "README.md").read_text()
    assert "meta: hello" in kept and "My card" in kept and "library_name: peft" in kept
    saved = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert saved["inference_mode"] is True and model.peft_config["default"].inference_mode is False
    assert saved["peft_version"] == model.peft_config["default"].peft_version


def test_config_types_and_errors(tmp_path: Path) -> None:
    assert [str(t) for t in deltatune.TaskType][:2] == [
        "SEQ_CLS",
        "SEQ_2_SEQ_LM",
    ] and deltatune.TaskType.CAUSAL_LM == "CAUSAL_LM"
    assert LoraConfig(task_type=deltatune.TaskType.SEQ_CLS).task_type == "SEQ_CLS"
    assert LoraConfig().peft_type.value == "LORA"
    config = LoraConfig(r=4, target_modules=["q"])
    config.save_pretrained(tmp_path)
    data = LoraConfig.from_json_file(tmp_path / "adapter_config.json")
    assert isinstance(data, dict) and data["inference_mode"] is False
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps({"foo": "bar"}))
    for cls in (LoraConfig, deltatune.PeftConfig):
        with pytest.raises(TypeError, match=re.escape("missing required keys: {'peft_type'}")):
            cls.from_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="missing required keys"):  # also a ValueError
        LoraConfig.from_pretrained(tmp_path / "other")
    with pytest.raises(FileNotFoundError) as missing:
        LoraConfig.from_pretrained(tmp_path / "nowhere")
    assert isinstance(missing.value, ValueError)  # what peft raises


def test_default_target_modules() -> None:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    gpt2 = get_peft_model(
        GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)), LoraConfig(r=2)
    )
    assert gpt2.peft_config["default"].target_modules == {"c_attn"}
    assert gpt2.targeted_module_names == ["h.0.attn.c_attn"]
    bert_config = BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8)
    bert = get_peft_model(BertModel(bert_config), deltatune.AdaLoraConfig(total_step=5))
    assert bert.peft_config["default"].target_modules == {"query", "value"}


# ---- warnings and error types PEFT users rely on --------------------------------------------------------
def test_merge_warnings_and_lora_bias_without_a_base_bias() -> None:
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"], **RANDOM))
    model.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        model.merge_adapter()
    model.unmerge_adapter()
    with pytest.warns(UserWarning, match="Already unmerged"):
        model.unmerge_adapter()
    with pytest.warns(PeftWarning, match="`lora_bias=True` was passed but the targeted layer of type Linear"):
        biased = get_peft_model(mlp(bias=False), LoraConfig(target_modules=["lin0"], lora_bias=True))
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        biased.merge_adapter()


def test_several_adapters_with_bias_are_refused_and_bias_warns_when_disabled() -> None:
    model = get_peft_model(mlp(), LoraConfig(target_modules=["lin0"], bias="all"))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", LoraConfig(target_modules=["lin0"], bias="lora_only"))
    assert set(model.peft_config) == {"default"}
    model.add_adapter("plain", LoraConfig(target_modules=["lin0"]))  # bias="none" joins it, as in peft
    with pytest.warns(UserWarning, match="disabling adapter layers with bias configured to be 'all'"):
        model.disable_adapter_layers()


def test_layers_expose_features_and_peft_style_repr() -> None:
    model = get_peft_model(EmbeddingNet(), LoraConfig(target_modules=["wte", "head"]))
    assert model.prefix == "lora_"
    assert repr(model.base_model.model.wte).startswith("lora.Embedding(")
    assert repr(model.base_model.model.head).startswith("lora.Linear(")
    head = model.base_model.model.head
    assert (head.in_features, head.out_features) == (8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained  # noqa: B018 (attribute access only)


class AttentionNet(nn.Module):
    """nn.MultiheadAttention (biases: in_proj_bias, out_proj.bias) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(x, x, x)[0])


def test_bias_all_covers_multihead_attention_in_proj_bias_as_peft_does(tmp_path: Path) -> None:
    """bias="all" trains the biases PEFT trains and saves and loads every bias PEFT's files hold: MHA's
    ``in_proj_bias`` is saved (not trained, as in PEFT) and loads back, also into a model configured with
    bias="none" (it was skipped there as a base weight, with only a log warning)."""
    peft = pytest.importorskip("peft")
    config = {"target_modules": ["mha"], "bias": "all", "init_lora_weights": False}
    ours = get_peft_model(AttentionNet(), LoraConfig(**config))
    theirs = peft.get_peft_model(AttentionNet(), peft.LoraConfig(**config))

    def trained(model: nn.Module) -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    assert trained(ours) == trained(theirs)
    assert any(n.endswith("in_proj_bias") for n in ours.state_dict()) and not any(
        n.endswith("in_proj_bias") for n in trained(ours)
    )
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "bias" in name.rsplit(".", 1)[-1]:
                p.fill_(1.23)
    ours.save_pretrained(tmp_path)
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(PeftModel.from_pretrained(AttentionNet(), tmp_path)(x), ours(x))
    # into a model whose own config says bias="none" (PEFT's FSDP round trip does this): the file's biases load
    plain = get_peft_model(AttentionNet(), LoraConfig(target_modules=["mha"]))
    result = deltatune.set_peft_model_state_dict(plain, deltatune.get_peft_model_state_dict(ours))
    assert result.unexpected_keys == []
    torch.testing.assert_close(plain(x), ours(x))
    # peft reads the same biases from the file (its outputs differ: it adds out_proj's delta twice, see
    # test_interop_peft.py::test_mha_same_files_peft_doubles_out_proj)
    biases = {n: p for n, p in peft.PeftModel.from_pretrained(AttentionNet(), tmp_path).named_parameters()}
    for name, p in ours.named_parameters():
        if "bias" in name.rsplit(".", 1)[-1]:
            assert torch.equal(biases[name], p), name
