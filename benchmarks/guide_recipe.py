"""The PEFT guide's image-classification recipe as a user runs it, for the end-to-end benchmarks.

peft + transformers ``Trainer`` + the guide's per-example torchvision transforms through ``set_transform``,
``dataloader_num_workers=0``; fp32 on a CPU, ``--fp16`` (the guide's ``fp16=True``) on a GPU. Departures from the guide:
transformers 5 spells ViT's attention projections ``q_proj``/``v_proj`` (peft does not map the guide's
``query``/``value``); an accuracy ``compute_metrics`` is added so that results can be compared (the guide
reports only the loss); the seed is set before the adapter is built, so reruns are repeatable.

Usage (the benchmark calls it; peft must be installed: ``pip install -e ".[cli,bench]"``)::

    python benchmarks/guide_recipe.py --data runs/e2e_jpegs/1000_200_5_512 --model runs/e2e_model/vit-small \\
        --output /tmp/guide-run --batch 32 --epochs 1 --json guide.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

T0 = time.perf_counter()  # the benchmark times the whole process; this is the in-process view

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torchvision.transforms import (  # noqa: E402
    CenterCrop,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
)
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    set_seed,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="image folder with train/ and validation/")
    p.add_argument("--model", required=True, help="base model directory (or hub id)")
    p.add_argument("--output", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--fp16", action="store_true", help="the guide's fp16=True (needs a GPU)")
    p.add_argument("--accumulation", type=int, default=1, help="gradient accumulation (the guide: 4)")
    args = p.parse_args()

    ds = load_dataset("imagefolder", data_dir=str(args.data), cache_dir=str(args.data / ".hf_cache"))
    labels = ds["train"].features["label"].names
    label2id = {label: i for i, label in enumerate(labels)}
    id2label = {i: label for i, label in enumerate(labels)}

    image_processor = AutoImageProcessor.from_pretrained(args.model)
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    train_transforms = Compose(
        [RandomResizedCrop(image_processor.size["height"]), RandomHorizontalFlip(), ToTensor(), normalize]
    )
    val_transforms = Compose(
        [
            Resize(image_processor.size["height"]),
            CenterCrop(image_processor.size["height"]),
            ToTensor(),
            normalize,
        ]
    )

    def preprocess_train(example_batch):  # type: ignore[no-untyped-def]
        example_batch["pixel_values"] = [
            train_transforms(image.convert("RGB")) for image in example_batch["image"]
        ]
        return example_batch

    def preprocess_val(example_batch):  # type: ignore[no-untyped-def]
        example_batch["pixel_values"] = [
            val_transforms(image.convert("RGB")) for image in example_batch["image"]
        ]
        return example_batch

    train_ds, val_ds = ds["train"], ds["validation"]
    train_ds.set_transform(preprocess_train)
    val_ds.set_transform(preprocess_val)

    def collate_fn(examples):  # type: ignore[no-untyped-def]
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.tensor([example["label"] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels}

    def compute_metrics(eval_pred):  # type: ignore[no-untyped-def]
        return {"accuracy": float((np.argmax(eval_pred.predictions, axis=1) == eval_pred.label_ids).mean())}

    set_seed(args.seed)  # not in the guide: makes peft's LoRA init repeatable for the benchmark
    model = AutoModelForImageClassification.from_pretrained(
        args.model, label2id=label2id, id2label=id2label, ignore_mismatched_sizes=True
    )
    config = LoraConfig(
        r=16,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],  # the guide's ["query", "value"] under transformers 5
        lora_dropout=0.1,
        bias="none",
        modules_to_save=["classifier"],
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    training_args = TrainingArguments(
        args.output,
        remove_unused_columns=False,
        eval_strategy="epoch",
        save_strategy="epoch",
        learning_rate=5e-3,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulation,
        fp16=args.fp16,
        per_device_eval_batch_size=args.batch,
        num_train_epochs=args.epochs,
        logging_steps=10,
        load_best_model_at_end=True,
        label_names=["labels"],
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model,
        training_args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=image_processor,
        data_collator=collate_fn,
        compute_metrics=compute_metrics,
    )
    output = trainer.train()
    accuracy = next(
        (e["eval_accuracy"] for e in reversed(trainer.state.log_history) if "eval_accuracy" in e), None
    )
    result = {
        "recipe": "guide",
        "accuracy": accuracy,
        "train_runtime_s": output.metrics["train_runtime"],
        "in_process_s": time.perf_counter() - T0,
        "torch_threads": torch.get_num_threads(),
        "precision": "fp16 mixed precision" if args.fp16 else "fp32",
        "train_samples_per_second": output.metrics.get("train_samples_per_second"),
        "pid": os.getpid(),
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
