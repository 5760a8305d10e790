"""PEFT's task classes (issue 17, item 4): ``task_type`` picks the class in ``get_peft_model`` and
``PeftModel.from_pretrained``; each forward takes its task's arguments; ``generate`` (greedy) gives peft's tokens
for a causal and an encoder-decoder language model; the heads a task trains are saved; adapters cross-load with
peft both ways; PEFT's error classes. Tiny transformers models built from configs (GPT-2, Llama, T5, BERT)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import deltatune
from deltatune import LoraConfig, get_peft_model

peft = pytest.importorskip("peft")

VOCAB = 64


def _bert_config(num_labels: int = 3) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
    )


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32))


def _llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def _t5() -> nn.Module:
    config = T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


#: task_type → (model factory, LoRA targets, the class, the head that must train with the adapter)
TASKS: dict[str, tuple[Callable[[], nn.Module], list[str], str, str | None]] = {
    "CAUSAL_LM": (_llama, ["q_proj", "v_proj"], "PeftModelForCausalLM", None),
    "SEQ_2_SEQ_LM": (_t5, ["q", "v", "wo"], "PeftModelForSeq2SeqLM", None),
    "SEQ_CLS": (
        lambda: BertForSequenceClassification(_bert_config()),
        ["query", "value"],
        "PeftModelForSequenceClassification",
        "classifier",
    ),
    "TOKEN_CLS": (
        lambda: BertForTokenClassification(_bert_config()),
        ["query", "value"],
        "PeftModelForTokenClassification",
        "classifier",
    ),
    "QUESTION_ANS": (
        lambda: BertForQuestionAnswering(_bert_config(2)),
        ["query", "value"],
        "PeftModelForQuestionAnswering",
        "qa_outputs",
    ),
    "FEATURE_EXTRACTION": (
        lambda: BertModel(_bert_config()),
        ["query", "value"],
        "PeftModelForFeatureExtraction",
        None,
    ),
}


def _model(task: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TASKS[task][0]().eval()


def _inputs(task: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 7), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (2, 5), generator=generator)
    return inputs


def _output(outputs: Any) -> torch.Tensor:
    for name in ("logits", "start_logits", "last_hidden_state"):
        value = getattr(outputs, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise AssertionError(f"no output tensor in {type(outputs).__name__}")


def _nonzero(model: nn.Module, seed: int = 5, scale: float = 0.3) -> None:
    """Random lora_B and heads, so that the adapter and the trained heads change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


@pytest.mark.parametrize("task", list(TASKS))
def test_task_type_picks_the_class_and_matches_peft(task: str, tmp_path: Path) -> None:
    _, targets, class_name, head = TASKS[task]
    ours = get_peft_model(_model(task), LoraConfig(r=4, target_modules=targets, task_type=task))
    assert type(ours) is getattr(deltatune, class_name)
    assert type(ours) is deltatune.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task]
    theirs = peft.get_peft_model(_model(task), peft.LoraConfig(r=4, target_modules=targets, task_type=task))
    assert type(theirs).__name__ == class_name
    forward = inspect.signature(type(ours).forward).parameters
    assert list(forward) == list(inspect.signature(type(theirs).forward).parameters)
    if head is not None:  # the task's head trains with the adapter, as in peft
        trained = {n for n, p in ours.named_parameters() if p.requires_grad and head in n}
        assert trained and trained == {
            n for n, p in theirs.named_parameters() if p.requires_grad and head in n
        }
    _nonzero(ours)
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(_model(task), tmp_path / "ours").eval()
    assert type(loaded).__name__ == class_name
    inputs = _inputs(task)
    with torch.no_grad():
        expected = _output(ours(**inputs))
        torch.testing.assert_close(_output(loaded(**inputs)), expected, atol=1e-5, rtol=0)
        with ours.disable_adapter():
            assert not torch.allclose(_output(ours(**inputs)), expected, atol=1e-4)  # the adapter acts
        loaded.save_pretrained(tmp_path / "theirs")
        back = deltatune.PeftModel.from_pretrained(_model(task), tmp_path / "theirs")
        assert type(back) is type(ours)
        torch.testing.assert_close(_output(back(**inputs)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_2_SEQ_LM"])
def test_generate_gives_peft_tokens(task: str, tmp_path: Path) -> None:
    _, targets, _, _ = TASKS[task]
    theirs = peft.get_peft_model(_model(task), peft.LoraConfig(r=4, target_modules=targets, task_type=task))
    _nonzero(theirs, scale=3.0)
    theirs.eval().save_pretrained(tmp_path)
    ours = deltatune.PeftModel.from_pretrained(_model(task), tmp_path)
    inputs = _inputs(task)
    inputs.pop("decoder_input_ids", None)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = theirs.generate(**inputs, **options)
        got = ours.generate(**inputs, **options)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    base = _model(task).generate(**inputs, **options)
    assert not torch.equal(base, got)  # the adapter changed the generated tokens


def test_causal_lm_generate_takes_input_ids_positionally_and_per_row_adapters() -> None:
    model = get_peft_model(
        _model("CAUSAL_LM"), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    _nonzero(model)
    model.eval()
    ids = _inputs("CAUSAL_LM")["input_ids"]
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        plain = model.generate(ids, **options)
        mixed = model.generate(input_ids=ids, adapter_names=["default", "__base__"], **options)
        with model.disable_adapter():
            base = model.generate(input_ids=ids, **options)
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[1], base[1])
    prepared = model.prepare_inputs_for_generation(ids, cache_position=torch.arange(ids.shape[1]))
    assert "cache_position" not in prepared and torch.equal(prepared["input_ids"], ids)


def test_seq2seq_generate_takes_keywords_only_as_in_peft() -> None:
    model = get_peft_model(
        _model("SEQ_2_SEQ_LM"), LoraConfig(r=4, target_modules=["q"], task_type="SEQ_2_SEQ_LM")
    )
    assert list(inspect.signature(model.generate).parameters) == ["kwargs"]
    with pytest.raises(TypeError):
        model.generate(_inputs("SEQ_2_SEQ_LM")["input_ids"])  # type: ignore[call-arg]


def test_gpt2_causal_lm_with_labels_gives_peft_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = dict(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM", fan_in_fan_out=True)
    ours = get_peft_model(_gpt2(), LoraConfig(**config))
    _nonzero(ours)
    ours.save_pretrained(tmp_path)
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(_gpt2(), tmp_path)
    ids = _inputs("CAUSAL_LM")["input_ids"]
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids, labels=ids).loss, theirs(input_ids=ids, labels=ids).loss
        )


def test_without_task_type_a_plain_peft_model() -> None:
    model = get_peft_model(_model("FEATURE_EXTRACTION"), LoraConfig(r=2, target_modules=["query"]))
    assert type(model) is deltatune.PeftModel


def test_the_question_answering_head_is_saved_under_peft_keys(tmp_path: Path) -> None:
    model = get_peft_model(
        _model("QUESTION_ANS"), LoraConfig(r=2, target_modules=["query"], task_type="QUESTION_ANS")
    )
    model.save_pretrained(tmp_path)
    saved = peft.utils.load_peft_weights(str(tmp_path))
    assert {k for k in saved if "qa_outputs" in k} == {
        "base_model.model.qa_outputs.weight",
        "base_model.model.qa_outputs.bias",
    }


def test_no_matching_module_is_peft_error_and_value_error() -> None:
    assert issubclass(deltatune.NoMatchingPeftModuleError, deltatune.PeftError)
    assert issubclass(deltatune.NoMatchingPeftModuleError, ValueError)
    assert [c.__name__ for c in deltatune.NoMatchingPeftModuleError.__mro__[:3]] == [
        c.__name__ for c in peft.utils.NoMatchingPeftModuleError.__mro__[:3]
    ]
    with pytest.raises(deltatune.NoMatchingPeftModuleError):
        get_peft_model(_model("FEATURE_EXTRACTION"), LoraConfig(r=2, target_modules=["nothing_here"]))
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(_model("FEATURE_EXTRACTION"), LoraConfig(r=2, target_modules=["nothing_here"]))


def test_auto_peft_model_loads_the_base_named_in_the_config(tmp_path: Path) -> None:
    base = _model("SEQ_CLS")
    base.save_pretrained(tmp_path / "base")
    base = type(base).from_pretrained(tmp_path / "base")  # get_peft_model names the base as it was loaded
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    _nonzero(model)
    model.eval().save_pretrained(tmp_path / "adapter")
    loaded = deltatune.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert type(loaded) is deltatune.PeftModelForSequenceClassification
    inputs = _inputs("SEQ_CLS")
    with torch.no_grad():
        torch.testing.assert_close(_output(loaded(**inputs)), _output(model(**inputs)))
    with pytest.raises(ValueError, match="Cannot use `AutoPeftModel` with a task type"):
        deltatune.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="Expected target PEFT class: PeftModelForSequenceClassification"):
        deltatune.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with pytest.raises(OSError, match="from_pretrained"):
        deltatune.AutoPeftModelForCausalLM()
