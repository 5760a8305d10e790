"""The Trainer integration: adapter-only checkpoints, exact resume, best-model loading, AdaLoRA allocation,
metrics, the guide's spellings and precision checks. Tiny random ViTs and synthetic data, CPU only."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny import LABELS, QUIET_CPU_ARGS, Blobs, tiny_vit
from transformers import ViTImageProcessor

import deltatune.train.arguments as arguments_module
from deltatune import AdaLoraConfig, AdaLoraModel, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from deltatune.serialization import get_adapter_state_dict
from deltatune.train import (
    DeltaTrainer,
    TrainingArguments,
    classification_report,
    compute_classification_metrics,
    load_label_maps,
)


def make_args(out: str, **kw: object) -> TrainingArguments:
    base: dict[str, object] = {
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "gradient_accumulation_steps": 2,
        "num_train_epochs": 3,
        "logging_steps": 2,
        **QUIET_CPU_ARGS,
    }
    base.update(kw)
    return TrainingArguments(output_dir=out, **base)  # type: ignore[arg-type]


def adalora_config(**kw: object) -> AdaLoraConfig:
    values: dict[str, object] = {
        "init_r": 6,
        "target_r": 2,
        "lora_alpha": 8,
        "tinit": 1,
        "deltaT": 1,
        "lora_dropout": 0.1,
        "target_modules": ["query", "value"],
        "modules_to_save": ["classifier"],
    }
    values.update(kw)
    return AdaLoraConfig(**values)  # type: ignore[arg-type]


CONFIGS = {
    "lora": lambda: LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"], modules_to_save=["classifier"]
    ),
    "loha": lambda: LoHaConfig(
        r=2, alpha=4, module_dropout=0.2, target_modules=["query", "value"], modules_to_save=["classifier"]
    ),
    "adalora": adalora_config,
}


def train(
    out: str, config: object, resume: str | None = None, **kw: object
) -> tuple[PeftModel, DeltaTrainer]:
    model = get_peft_model(tiny_vit(), config)  # type: ignore[arg-type]
    trainer = DeltaTrainer(model, make_args(out, **kw), train_dataset=Blobs(64, 1), eval_dataset=Blobs(32, 2))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


# ---- AdaLoRA ------------------------------------------------------------------------------------
def test_adalora_ranks_change_under_trainer_and_reload(tmp_path: object) -> None:
    out = os.fspath(tmp_path)
    config = adalora_config()
    assert config.total_step is None
    model = get_peft_model(tiny_vit(), config)
    allocator = model.base_model.rank_allocator
    calls: list[bool] = []
    original = allocator.update_ipt

    def spy() -> bool:
        ok = original()
        calls.append(ok)
        return ok

    allocator.update_ipt = spy  # type: ignore[method-assign]
    trainer = DeltaTrainer(model, make_args(out), train_dataset=Blobs(64, 1), eval_dataset=Blobs(32, 2))
    trainer.train()
    # total_step came from the trainer's plan: 64 / 8 = 8 batches, / 2 accumulation = 4 steps x 3 epochs
    assert config.total_step == trainer.state.max_steps == 12
    assert calls and all(calls), "update_and_allocate must run while gradients exist"
    pattern = model.peft_config["default"].rank_pattern
    assert pattern and len(pattern) == 4
    kept = {k: sum(v) for k, v in pattern.items()}
    assert any(not all(v) for v in pattern.values()), "some singular values must be pruned"
    assert sum(kept.values()) == config.target_r * 4
    assert len(set(kept.values())) > 1, f"budget should be reallocated unevenly, got {kept}"

    trainer.save_model(out)
    model.eval()
    x = Blobs(4, 9).images
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    reloaded = PeftModel.from_pretrained(tiny_vit(), out)
    ranks = {name: layer.r["default"] for name, layer in reloaded.base_model.adapter_layers()}
    for name, r in ranks.items():
        assert r == kept[f"{name}.lora_E"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, expected)
    assert not os.path.exists(os.path.join(out, AdaLoraModel.CHECKPOINT_STATE_FILE)), (
        "resume state belongs in checkpoints only"
    )
    assert os.path.exists(os.path.join(out, "checkpoint-4", AdaLoraModel.CHECKPOINT_STATE_FILE))


@pytest.mark.parametrize("accumulation", [1, 3])
def test_orthogonal_regulariser_reaches_the_loss(tmp_path: object, accumulation: int) -> None:
    config = adalora_config(orth_reg_weight=0.5, lora_dropout=0.0)
    model = get_peft_model(tiny_vit(), config)
    args = make_args(os.fspath(tmp_path), gradient_accumulation_steps=accumulation, eval_strategy="no")
    trainer = DeltaTrainer(model, args)
    batch = Blobs(8, 3)[:8]
    model.train()
    trainer.current_gradient_accumulation_steps = accumulation
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(8 * accumulation))
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"]).logits
        ce_sum = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
        orth = model.base_model.orthogonal_loss()
    # the model's loss is normalised over the accumulated batch, so the regulariser is split as well
    expected = (ce_sum + 0.5 * orth * 8) / (8 * accumulation)
    torch.testing.assert_close(loss.detach(), expected)
    assert orth > 0
    assert config.orth_reg_weight == 0.5


def test_adalora_schedule_that_cannot_fit_fails_before_training(tmp_path: object) -> None:
    model = get_peft_model(tiny_vit(), adalora_config(tinit=10, tfinal=5))
    trainer = DeltaTrainer(
        model, make_args(os.fspath(tmp_path), eval_strategy="no"), train_dataset=Blobs(64, 1)
    )
    with pytest.raises(ValueError, match=r"tinit=10 must be < total_step - tfinal = 12 - 5"):
        trainer.train()
    assert trainer.state.global_step == 0


# ---- checkpoints --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_resume_from_adapter_checkpoint_matches_uninterrupted_run(tmp_path: object, method: str) -> None:
    full_dir, resumed_dir = os.path.join(tmp_path, "full"), os.path.join(tmp_path, "resumed")  # type: ignore[arg-type]
    full, _ = train(full_dir, CONFIGS[method]())
    resumed, trainer = train(resumed_dir, CONFIGS[method](), resume=os.path.join(full_dir, "checkpoint-4"))
    assert trainer.state.global_step == 12
    first, second = full.state_dict(), resumed.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    if method == "adalora":
        assert full.peft_config["default"].rank_pattern == resumed.peft_config["default"].rank_pattern


def test_checkpoint_is_adapter_sized(tmp_path: object) -> None:
    out = os.fspath(tmp_path)
    base = tiny_vit(hidden_size=128, intermediate_size=512, num_attention_heads=4)
    base.save_pretrained(os.path.join(out, "base"))
    base_bytes = os.path.getsize(os.path.join(out, "base", "model.safetensors"))
    config = LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_peft_model(base, config)
    args = make_args(
        os.path.join(out, "run"), num_train_epochs=1, eval_strategy="no", load_best_model_at_end=False
    )
    DeltaTrainer(model, args, train_dataset=Blobs(16, 1)).train()
    checkpoint = os.path.join(out, "run", "checkpoint-1")
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json", "labels.json", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "training_args.bin"}
    adapter_bytes = os.path.getsize(os.path.join(checkpoint, "adapter_model.safetensors"))
    everything = sum(os.path.getsize(os.path.join(checkpoint, f)) for f in files)
    assert adapter_bytes < 0.03 * base_bytes, (adapter_bytes, base_bytes)
    assert everything < 0.15 * base_bytes, (everything, base_bytes)
    id2label, label2id = load_label_maps(checkpoint)
    assert id2label == LABELS and label2id["two"] == 2


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path: object) -> None:
    # "best" = highest eval loss, so the best checkpoint is (almost surely) not the last one
    model, trainer = train(
        os.fspath(tmp_path),
        CONFIGS["lora"](),
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,
    )
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-12")
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    current = get_adapter_state_dict(model.base_model, "default")
    assert saved.keys() == current.keys()
    for key, value in saved.items():
        assert torch.equal(value, current[key]), key
    for _, p in model.base_model.adapter_layers():
        assert all(t.requires_grad for t in p.adapter_parameters("default"))
    # run_training reports the logged evaluation of the model it ended with instead of evaluating again
    from deltatune.train.run import logged_final_evaluation

    logged = logged_final_evaluation(trainer)
    assert logged is not None and logged["epoch"] < 3  # the best checkpoint's evaluation, not the last one
    fresh = trainer.evaluate()
    assert logged["eval_loss"] == pytest.approx(fresh["eval_loss"], abs=1e-6)
    assert logged["eval_accuracy"] == pytest.approx(fresh["eval_accuracy"])


# ---- the guide, verbatim ------------------------------------------------------------------------
def test_guide_arguments_and_spellings_work(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    from datasets import Dataset

    rng = np.random.default_rng(0)
    labels = [i % 3 for i in range(48)]
    images = [Image.fromarray((rng.random((40, 40, 3)) * 80 + 60 * y).astype(np.uint8)) for y in labels]
    ds = Dataset.from_dict({"image": images, "label": labels})
    processor = ViTImageProcessor(size={"height": 32, "width": 32})

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        batch["pixel_values"] = [
            processor(img.convert("RGB"), return_tensors="pt")["pixel_values"][0] for img in batch["image"]
        ]
        return batch

    train_ds, val_ds = ds.select(range(32)), ds.select(range(32, 48))
    train_ds.set_transform(preprocess)
    val_ds.set_transform(preprocess)

    def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        return {
            "pixel_values": pixel_values,
            "labels": torch.tensor([example["label"] for example in examples]),
        }

    model = get_peft_model(tiny_vit(), CONFIGS["lora"]())
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        args = TrainingArguments(
            os.fspath(tmp_path),
            remove_unused_columns=False,
            evaluation_strategy="epoch",
            save_strategy="epoch",
            learning_rate=5e-3,
            per_device_train_batch_size=128,
            gradient_accumulation_steps=4,
            per_device_eval_batch_size=128,
            num_train_epochs=5,
            logging_steps=10,
            load_best_model_at_end=True,
            label_names=["labels"],
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
        )
        trainer = DeltaTrainer(
            model,
            args,
            train_dataset=train_ds,
            eval_dataset=val_ds,
            tokenizer=processor,
            data_collator=collate_fn,
        )
    notices = [r.getMessage() for r in caplog.records]
    assert any("evaluation_strategy" in m and "eval_strategy" in m for m in notices)
    assert any("tokenizer=" in m and "processing_class" in m for m in notices)
    assert str(args.eval_strategy.value) == "epoch" and trainer.processing_class is processor
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    assert len(evals) == 5 and trainer.state.best_model_checkpoint is not None
    assert os.path.isfile(os.path.join(trainer.state.best_model_checkpoint, "preprocessor_config.json"))


def test_conflicting_spellings_are_refused(tmp_path: object) -> None:
    with pytest.raises(ValueError, match="pass only eval_strategy"):
        TrainingArguments(os.fspath(tmp_path), evaluation_strategy="epoch", eval_strategy="steps")
    processor = ViTImageProcessor()
    with pytest.raises(ValueError, match=r"tokenizer= .* or processing_class="):
        DeltaTrainer(
            tiny_vit(),
            make_args(os.fspath(tmp_path)),
            tokenizer=processor,
            processing_class=ViTImageProcessor(),
        )


def test_impossible_precision_is_a_clear_error(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arguments_module, "accelerator_name", lambda: None)
    with pytest.raises(ValueError, match=r"fp16 mixed precision needs a GPU.*drop --fp16"):
        TrainingArguments(os.fspath(tmp_path), fp16=True)
    with pytest.raises(ValueError, match=r"bf16 .*no GPU.*--use_cpu"):
        TrainingArguments(os.fspath(tmp_path), bf16=True)
    assert arguments_module.check_precision(TrainingArguments(os.fspath(tmp_path), use_cpu=True)) == "fp32"
    plain = make_args(os.fspath(tmp_path), eval_strategy="no")
    plain.fp16 = True  # a transformers TrainingArguments built elsewhere: caught by the trainer
    with pytest.raises(ValueError, match="fp16 mixed precision needs a GPU"):
        DeltaTrainer(tiny_vit(), plain)


# ---- metrics ------------------------------------------------------------------------------------
def test_classification_metrics() -> None:
    logits = np.array([[3.0, 1, 0], [0, 2, 1], [0, 1, 2], [2, 0, 1]])
    labels = np.array([0, 2, 2, 1])
    assert compute_classification_metrics((logits, labels)) == {"accuracy": 0.5}
    many = np.eye(8)[[0, 1, 2, 3]] + np.linspace(0, 0.5, 8)
    metrics = compute_classification_metrics((many, np.array([0, 1, 7, 2])))
    assert metrics["accuracy"] == 0.5 and metrics["top5_accuracy"] == 0.75
    report = classification_report(logits, labels, ["a", "b", "c"])
    assert report.per_class_accuracy == {"a": 1.0, "b": 0.0, "c": 0.5}
    assert report.confusion.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    assert report.top5_accuracy is None and report.num_examples == 4
