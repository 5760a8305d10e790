"""The PEFT API as a ported script uses it, compared with peft on the same tiny models (the u-lib tester's
findings L18-L22): ``load_adapter`` into an existing adapter, plain ``transformers.Trainer`` saving and resuming,
which embeddings ``save_embedding_layers`` writes, and peft's public names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import QUIET_CPU_ARGS, Blobs, tiny_vit
from torch import nn
from transformers import Trainer, TrainingArguments

import deltatune as dt

peft = pytest.importorskip("peft")

LIBRARIES = pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@LIBRARIES
def test_load_adapter_into_the_trained_adapter_keeps_it_trainable(library: object, tmp_path: Path) -> None:
    lib: object = library
    config = {"r": 2, "target_modules": ["0"], "modules_to_save": ["2"]}
    saved = lib.get_peft_model(_mlp(), lib.LoraConfig(init_lora_weights=False, **config))  # type: ignore[attr-defined]
    saved.save_pretrained(tmp_path)
    model = lib.get_peft_model(_mlp(), lib.LoraConfig(**config))  # type: ignore[attr-defined]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    model.load_adapter(tmp_path, adapter_name="default")  # restore the weights; is_trainable left at False
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    assert len(trainable) == 4  # lora_A, lora_B and the head copy's weight and bias
    x = torch.randn(3, 4)
    assert torch.allclose(model(x), saved(x))  # the weights were replaced
    assert not model.training  # is_trainable=False still puts the model in eval mode, as peft
    model(x).pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


@LIBRARIES
def test_load_adapter_new_adapter_not_trainable_stays_frozen(library: object, tmp_path: Path) -> None:
    lib: object = library
    lib.get_peft_model(_mlp(), lib.LoraConfig(r=2, target_modules=["0"])).save_pretrained(tmp_path)  # type: ignore[attr-defined]
    model = lib.get_peft_model(_mlp(), lib.LoraConfig(r=2, target_modules=["0"]))  # type: ignore[attr-defined]
    model.load_adapter(tmp_path, adapter_name="other")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".default" in n)


def _vit_lora(lib: object) -> nn.Module:
    config = lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])  # type: ignore[attr-defined]
    return lib.get_peft_model(tiny_vit(), config)  # type: ignore[attr-defined, no-any-return]


@LIBRARIES
def test_plain_trainer_save_model_before_any_training_writes_the_adapter(
    library: object, tmp_path: Path
) -> None:
    trainer = Trainer(
        model=_vit_lora(library),
        args=TrainingArguments(tmp_path / "run", **QUIET_CPU_ARGS),
        eval_dataset=Blobs(4, 1),
    )
    trainer.evaluate()
    trainer.save_model(tmp_path / "saved")
    assert (tmp_path / "saved" / "adapter_config.json").is_file()
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()
    reloaded = library.PeftModel.from_pretrained(tiny_vit(), tmp_path / "saved")  # type: ignore[attr-defined]
    assert reloaded.peft_config["default"].target_modules == {"q_proj", "v_proj"}


def test_plain_trainer_resumes_from_a_peft_checkpoint(tmp_path: Path) -> None:
    def args(save: str) -> TrainingArguments:
        return TrainingArguments(
            tmp_path, max_steps=2, per_device_train_batch_size=4, learning_rate=0.05, save_strategy=save,
            save_steps=1, **QUIET_CPU_ARGS,
        )  # fmt: skip

    uninterrupted = _vit_lora(peft)
    Trainer(model=uninterrupted, args=args("steps"), train_dataset=Blobs(8, 0)).train()
    checkpoint = tmp_path / "checkpoint-1"
    assert not (checkpoint / "model.safetensors").exists()  # peft's checkpoints hold adapter files only
    resumed = _vit_lora(dt)
    Trainer(model=resumed, args=args("no"), train_dataset=Blobs(8, 0)).train(
        resume_from_checkpoint=str(checkpoint)
    )
    pixels = torch.stack([Blobs(4, 1)[i]["pixel_values"] for i in range(4)])
    uninterrupted.eval()
    resumed.eval()
    with torch.no_grad():
        diff = (resumed(pixel_values=pixels).logits - uninterrupted(pixel_values=pixels).logits).abs().max()
    assert diff < 1e-4


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_save_embedding_layers_saves_only_the_targeted_embedding(
    target: str, tie: bool, tmp_path: Path
) -> None:
    from safetensors.torch import load_file
    from tiny import tiny_llama

    saved = {}
    for lib in (dt, peft):
        model = lib.get_peft_model(
            tiny_llama(tie=tie), lib.LoraConfig(r=2, target_modules=["q_proj", target])
        )
        model.save_pretrained(tmp_path / lib.__name__)
        keys = load_file(tmp_path / lib.__name__ / "adapter_model.safetensors").keys()
        saved[lib.__name__] = sorted(k for k in keys if "lora_" not in k)
    assert saved["deltatune"] == saved["peft"]
    assert len(saved["peft"]) == 1 and f"{target}.base_layer.weight" in saved["peft"][0]


def test_peft_utils_names_and_load_peft_weights_as_peft(tmp_path: Path) -> None:
    import peft.utils

    import deltatune.utils

    for name in ("get_peft_model_state_dict", "set_peft_model_state_dict", "load_peft_weights", "TaskType"):
        assert hasattr(peft.utils, name) and hasattr(deltatune.utils, name), name
    assert deltatune.utils.TaskType.SEQ_CLS == peft.utils.TaskType.SEQ_CLS
    peft.get_peft_model(
        _mlp(), peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    ).save_pretrained(tmp_path)
    ours, theirs = dt.load_peft_weights(str(tmp_path)), peft.load_peft_weights(str(tmp_path))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    mapping = {r"model\.0\.": "model.first."}
    mapped = deltatune.utils.load_peft_weights(str(tmp_path), key_mapping=mapping)
    assert sorted(mapped) == sorted(peft.utils.load_peft_weights(str(tmp_path), key_mapping=mapping))
