"""The tiny random ViT and the synthetic "blobs" data the training, error and DDP tests share.

Kept apart from conftest.py so that subprocess scripts (``train_worker.py``) can import it too; also the tiny
Llama the language-model tests share.
"""

from __future__ import annotations

import os

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

TINY_VIT_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
    "num_labels": 3,
}
LABELS = {0: "zero", 1: "one", 2: "two"}
#: TrainingArguments every training test shares: deterministic, on the CPU, no reporting or progress bars.
QUIET_CPU_ARGS = {
    "label_names": ["labels"],
    "remove_unused_columns": False,
    "report_to": "none",
    "use_cpu": True,
    "seed": 0,
    "disable_tqdm": True,
}


def tiny_llama(seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    """A random Llama (vocabulary 50, hidden 16, 2 layers, 2 heads) in eval mode, its embeddings tied when
    ``tie`` (tied as ``from_pretrained`` ties them, whatever ran before in this process)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).eval()
    model.tie_weights()
    return model


def tiny_vit(seed: int = 0, **overrides: int) -> ViTForImageClassification:
    """A two-layer random ViT (32 px, 3 labels), bit-identical for the same seed; in train mode."""
    torch.manual_seed(seed)
    config = ViTConfig(**{**TINY_VIT_CONFIG, **overrides})
    config.id2label, config.label2id = dict(LABELS), {v: k for k, v in LABELS.items()}
    return ViTForImageClassification(config)


def save_tiny_vit_dir(directory: str | os.PathLike[str], seed: int = 0, **overrides: int) -> str:
    """Saves a tiny random ViT (TINY_VIT_CONFIG's shape, transformers' default 2-label head unless
    ``num_labels`` is given) with its 32 px image processor, as ``from_pretrained`` reads it; returns the path."""
    torch.manual_seed(seed)
    shape = {k: v for k, v in TINY_VIT_CONFIG.items() if k != "num_labels"}
    ViTForImageClassification(ViTConfig(**{**shape, **overrides})).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return os.fspath(directory)


class Blobs(torch.utils.data.Dataset):
    """(3, 32, 32) images whose mean brightness depends on the class; rows {"pixel_values", "labels"}."""

    def __init__(self, n: int, seed: int, noise: float = 0.5) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n,), generator=gen)
        self.images = torch.randn(n, 3, 32, 32, generator=gen) * noise + self.labels.view(-1, 1, 1, 1) * 0.4

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def write_image_folder(root: str | os.PathLike[str], per_class: int = 6, seed: int = 0) -> str:
    """An image folder of three learnable classes (bright, dark, red 40 px PNGs); returns its path."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for kind in ("bright", "dark", "red"):
        folder = os.path.join(root, kind)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (40, 40, 3)).astype(np.uint8)
            if kind == "bright":
                pixels += 150
            elif kind == "red":
                pixels[..., 0] += 180
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return os.fspath(root)


#: The flags of the smallest real `deltatune train` run: one epoch, batch 4, CPU, LoRA r=2.
TINY_RUN_FLAGS = [
    "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--use_cpu", "--disable_tqdm", "true",
    "--seed", "0", "--validation_split", "0.25", "--method", "lora", "--r", "2",
]  # fmt: skip


def tiny_train_argv(root: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[str]:
    """``deltatune train`` on ``root/model`` and ``root/data`` into ``out``, with :data:`TINY_RUN_FLAGS`."""
    return [
        "train",
        "--model",
        os.path.join(root, "model"),
        "--dataset",
        os.path.join(root, "data"),
        "--output_dir",
        os.fspath(out),
        *TINY_RUN_FLAGS,
    ]


def tiny_trained_run(root: str | os.PathLike[str], per_class: int) -> str:
    """A tiny saved ViT (``root/model``), an image folder (``root/data``, ``per_class`` images per class) and a
    finished ``deltatune train`` run on them (``root/run``, :data:`TINY_RUN_FLAGS`); returns the run's path."""
    from deltatune.cli import main

    save_tiny_vit_dir(os.path.join(root, "model"))
    write_image_folder(os.path.join(root, "data"), per_class=per_class)
    run = os.path.join(root, "run")
    assert main(tiny_train_argv(root, run)) == 0
    return run


def write_train_val_assets(root: str | os.PathLike[str]) -> dict[str, str]:
    """A tiny saved ViT (``root/model``) and separate train (6 per class) and val (2 per class) image folders."""
    save_tiny_vit_dir(os.path.join(root, "model"))
    write_image_folder(os.path.join(root, "train"), per_class=6, seed=0)
    write_image_folder(os.path.join(root, "val"), per_class=2, seed=1)
    return {
        "root": os.fspath(root),
        "model": os.path.join(root, "model"),
        "train": os.path.join(root, "train"),
        "val": os.path.join(root, "val"),
    }
