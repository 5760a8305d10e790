"""The data path alone: the PEFT guide's per-example torchvision pipeline vs deltatune's fast one.

Generates a JPEG image folder (default 1,000 train + 200 validation images of 512 px in 5 classes,
synthetic but compressible: smooth class-dependent patterns, shapes and mild noise) and measures
images/s through decode + transforms + collate (no model) for both recipes, interleaved:

- guide: ``datasets.load_dataset("imagefolder")`` + ``set_transform`` with the guide's torchvision
  ``Compose`` (RandomResizedCrop / RandomHorizontalFlip / ToTensor / Normalize; Resize / CenterCrop for
  validation) + its ``collate_fn``;
- deltatune: :class:`deltatune.vision.fast.FastImageTransform` (reduced-size JPEG decoding, one resampling
  pass, uint8 until the batch) over undecoded paths + :class:`~deltatune.vision.fast.FastCollate`.

Run from the repository root::

    python -m benchmarks.e2e                 # generates runs/e2e_jpegs on first use
    python -m benchmarks.e2e --quick         # 200 + 50 images, 2 rounds
    python -m benchmarks.e2e --workers 2 --json data_path.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/e2e.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import numpy as np
import torch
from PIL import Image

MEAN, STD, SIZE = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], 224  # ViTImageProcessor's defaults


def synthetic_image(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """A compressible RGB image whose stripe frequency and palette depend on ``label``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq = 1.0 + label + rng.uniform(0, 0.5, 3)
    phase = rng.uniform(0, 2 * np.pi, 3)
    angle = rng.uniform(0, np.pi)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    img = np.stack([np.sin(2 * np.pi * freq[c] * u + phase[c]) for c in range(3)], axis=-1) * 80 + 128
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0, size, 2)
        radius = rng.uniform(size / 20, size / 4)
        inside = (xx * size - cx) ** 2 + (yy * size - cy) ** 2 < radius**2
        img[inside] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 2.0, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def generate(root: Path, n_train: int, n_val: int, classes: int, size: int, seed: int = 0) -> None:
    """Writes ``root/{train,validation}/class_<k>/<i>.jpg`` (JPEG quality 90) unless already there."""
    marker = root / f".complete-{n_train}-{n_val}-{classes}-{size}"
    if marker.exists():
        return
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("validation", n_val)):
        for i in range(count):
            label = i % classes
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            synthetic_image(rng, label, size).save(folder / f"{i:05d}.jpg", quality=90)
    marker.touch()


def guide_loaders(root: Path, batch: int, workers: int) -> dict[str, Any]:
    """The guide's recipe: datasets imagefolder + set_transform(torchvision Compose) + collate_fn."""
    from datasets import load_dataset
    from torchvision.transforms import (
        CenterCrop,
        Compose,
        Normalize,
        RandomHorizontalFlip,
        RandomResizedCrop,
        Resize,
        ToTensor,
    )

    ds = load_dataset("imagefolder", data_dir=str(root), cache_dir=str(root / ".hf_cache"))
    normalize = Normalize(mean=MEAN, std=STD)
    train_tf = Compose([RandomResizedCrop(SIZE), RandomHorizontalFlip(), ToTensor(), normalize])
    val_tf = Compose([Resize(SIZE), CenterCrop(SIZE), ToTensor(), normalize])
    train_ds, val_ds = ds["train"], ds["validation"]
    train_ds.set_transform(
        lambda b: {**b, "pixel_values": [train_tf(im.convert("RGB")) for im in b["image"]]}
    )
    val_ds.set_transform(lambda b: {**b, "pixel_values": [val_tf(im.convert("RGB")) for im in b["image"]]})

    def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.tensor([example["label"] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels}

    def loader(d: Any, shuffle: bool) -> Any:
        return torch.utils.data.DataLoader(
            d, batch_size=batch, shuffle=shuffle, collate_fn=collate_fn, num_workers=workers
        )

    return {"train": loader(train_ds, True), "validation": loader(val_ds, False)}


def fast_loaders(root: Path, batch: int, workers: int, draft: str | None) -> dict[str, Any]:
    """deltatune's fast path over the same folder."""
    from deltatune.vision import ImageFolderDataset, TransformedDataset
    from deltatune.vision.fast import FastImageTransform, ImagePathRows

    stats = {"image_mean": MEAN, "image_std": STD, "size": {"height": SIZE, "width": SIZE}}
    train_folder = ImageFolderDataset.from_directory(root / "train")
    val_folder = ImageFolderDataset.from_directory(root / "validation", train_folder.class_names)
    out = {}
    for split, folder, train in (("train", train_folder, True), ("validation", val_folder, False)):
        transform = FastImageTransform.from_processor(stats, train=train, draft=draft)
        data = TransformedDataset(ImagePathRows(folder.files, folder.labels), transform)
        out[split] = torch.utils.data.DataLoader(
            data, batch_size=batch, shuffle=train, collate_fn=transform.collate(), num_workers=workers
        )
    return out


def epoch_rate(loader: Any) -> tuple[float, int]:
    """Images per second over one pass of ``loader`` (and the image count)."""
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        n += int(batch["pixel_values"].shape[0])
    return n / (time.perf_counter() - t0), n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("runs/e2e_jpegs"), help="image folder (generated)")
    p.add_argument("--train-images", type=int, default=None, help="default 1000 (200 with --quick)")
    p.add_argument("--val-images", type=int, default=None, help="default 200 (50 with --quick)")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers, both recipes")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, as in DataLoader workers)"
    )
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; 2 with --quick)")
    p.add_argument(
        "--draft", choices=["image", "crop", "none"], default="image", help="fast path's JPEG draft"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: fewer images and rounds")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    n_train = args.train_images or (200 if args.quick else 1000)
    n_val = args.val_images or (50 if args.quick else 200)
    repeats = args.repeats or (2 if args.quick else 3)
    root = args.data.resolve() / f"{n_train}_{n_val}_{args.classes}_{args.image_size}"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    generate(root, n_train, n_val, args.classes, args.image_size)
    print(
        f"data: {root} ({n_train} train + {n_val} validation JPEGs, {args.image_size} px; {time.perf_counter() - t0:.1f} s)"
    )
    recipes = {
        "guide": guide_loaders(root, args.batch, args.workers),
        "deltatune": fast_loaders(
            root, args.batch, args.workers, None if args.draft == "none" else args.draft
        ),
    }
    for loaders in recipes.values():  # warm-up: file cache, imports, datasets' arrow files
        for loader in loaders.values():
            epoch_rate(loader)
    rates: dict[str, dict[str, list[float]]] = {
        r: {"train": [], "validation": [], "all": []} for r in recipes
    }
    for rnd in range(repeats):
        for name in list(recipes)[rnd % 2 :] + list(recipes)[: rnd % 2]:
            seconds, images = 0.0, 0
            for split, loader in recipes[name].items():
                rate, n = epoch_rate(loader)
                rates[name][split].append(rate)
                seconds += n / rate
                images += n
            rates[name]["all"].append(images / seconds)
    medians = {r: {s: statistics.median(v) for s, v in splits.items()} for r, splits in rates.items()}
    print(
        f"\nData path: images/s through decode + transforms + collate (batch {args.batch}, "
        f"{args.workers} workers, {torch.get_num_threads()} torch threads; median of {repeats} interleaved epochs)"
    )
    print("| split | guide (torchvision per example) | deltatune fast path | speed-up |")
    print("|---|---:|---:|---:|")
    for split in ("train", "validation", "all"):
        g, d = medians["guide"][split], medians["deltatune"][split]
        print(f"| {split} | {g:.0f} | {d:.0f} | {d / g:.2f}x |")
    result = {
        "settings": {**{k: str(v) for k, v in vars(args).items()}, "repeats": repeats, "root": str(root)},
        "images_per_s": rates,
        "median_images_per_s": medians,
        "speedup": {s: medians["deltatune"][s] / medians["guide"][s] for s in ("train", "validation", "all")},
        "load_avg": os.getloadavg(),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nJSON written to {args.json}")
    return result


if __name__ == "__main__":
    main()
