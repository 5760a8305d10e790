"""End to end: the PEFT guide's recipe vs ``deltatune train``, whole runs and the data path alone.

Generates a JPEG image folder (default 1,000 train + 200 validation images of 512 px in 5 classes,
synthetic but compressible: smooth class-dependent patterns, shapes and mild noise) and a ViT-Small-shaped
base model (random weights, seeded; ``--model-shape base`` for ViT-base), then measures, interleaved:

1. **Whole runs** (``--part train``): wall time of one process per recipe, start to finish (imports, data,
   model, one epoch of training with its evaluation, saving), and the validation accuracy each reaches:

   - guide: ``benchmarks/guide_recipe.py`` -- peft + ``Trainer`` + per-example torchvision transforms via
     ``set_transform``, fp32, ``dataloader_num_workers=0``;
   - deltatune: ``deltatune train`` with its defaults, given the same data, model, batch, epochs and seed.

2. **The data path alone** (``--part data``): images/s through decode + transforms + collate (no model):

   - guide: ``datasets.load_dataset("imagefolder")`` + ``set_transform`` with the guide's torchvision
     ``Compose`` + its ``collate_fn``;
   - deltatune: :class:`deltatune.vision.fast.FastImageTransform` (reduced-size JPEG decoding, one
     resampling pass, uint8 until the batch) over undecoded paths + :class:`~deltatune.vision.fast.FastCollate`
     for training; evaluation as a run evaluates (:mod:`deltatune.vision.preprocess`: full decoding).

Run from the repository root (needs ``pip install -e ".[cli,bench]"`` for peft and torchvision)::

    python -m benchmarks.e2e                       # both parts; generates runs/e2e_jpegs on first use
    python -m benchmarks.e2e --part data --quick   # 200 + 50 images, 2 rounds
    python -m benchmarks.e2e --part train --rounds 2 --json e2e.json
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import statistics
import subprocess
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

from .workloads import SHAPES

MEAN, STD, SIZE = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], 224  # ViTImageProcessor's defaults


def synthetic_image(rng: np.random.Generator, label: int, size: int, classes: int) -> Image.Image:
    """A compressible RGB image of class ``label``: a class hue (jittered) under stripes whose frequency
    also follows the class, partly covered by randomly coloured discs, plus mild noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    hue = (label + rng.uniform(-0.25, 0.25)) / classes
    base = np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.4, 0.8), rng.uniform(0.5, 0.9))) * 255
    freq = 1.0 + label + rng.uniform(0, 0.5)
    angle = rng.uniform(0, np.pi)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    stripes = np.sin(2 * np.pi * freq * u + rng.uniform(0, 2 * np.pi))[..., None]
    img = base + stripes * rng.uniform(20, 60)
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0, size, 2)
        radius = rng.uniform(size / 20, size / 4)
        inside = (xx * size - cx) ** 2 + (yy * size - cy) ** 2 < radius**2
        img[inside] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 2.0, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def generate(root: Path, n_train: int, n_val: int, classes: int, size: int, seed: int = 0) -> None:
    """Writes ``root/{train,validation}/class_<k>/<i>.jpg`` (JPEG quality 90) unless already there."""
    marker = root / f".complete-v2-{n_train}-{n_val}-{classes}-{size}"
    if marker.exists():
        return
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("validation", n_val)):
        for i in range(count):
            label = i % classes
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            synthetic_image(rng, label, size, classes).save(folder / f"{i:05d}.jpg", quality=90)
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
    from deltatune.vision.preprocess import EvalCollate, EvalTransform, evaluation_processor

    stats = {"image_mean": MEAN, "image_std": STD, "size": {"height": SIZE, "width": SIZE}}
    train_folder = ImageFolderDataset.from_directory(root / "train")
    val_folder = ImageFolderDataset.from_directory(root / "validation", train_folder.class_names)
    transform = FastImageTransform.from_processor(stats, train=True, draft=draft)
    train_data = TransformedDataset(ImagePathRows(train_folder.files, train_folder.labels), transform)
    # evaluation as a run evaluates: transformers' decoding and the evaluation processor, whatever the pipeline
    val_data = TransformedDataset(
        ImagePathRows(val_folder.files, val_folder.labels),
        EvalTransform(evaluation_processor(stats)),
        skip_unreadable=True,
    )
    return {
        "train": torch.utils.data.DataLoader(
            train_data, batch_size=batch, shuffle=True, collate_fn=transform.collate(), num_workers=workers
        ),
        "validation": torch.utils.data.DataLoader(
            val_data, batch_size=batch, collate_fn=EvalCollate(transform.collate()), num_workers=workers
        ),
    }


def epoch_rate(loader: Any) -> tuple[float, int]:
    """Images per second over one pass of ``loader`` (and the image count)."""
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        n += int(batch["pixel_values"].shape[0])
    return n / (time.perf_counter() - t0), n


MODEL_SHAPES = SHAPES  # ViT-Small (default), ViT-Base, tiny (smoke runs)


def make_model(directory: Path, shape: str, classes: int, seed: int = 0) -> Path:
    """Saves a ViT of ``shape`` with random (seeded) weights, its head already sized and labelled for the
    generated classes, so that both recipes start from exactly the same weights."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = directory / f"vit-{shape}-{classes}"
    if (path / "model.safetensors").is_file():
        return path
    torch.manual_seed(seed)
    names = {i: f"class_{i}" for i in range(classes)}
    config = ViTConfig(
        **MODEL_SHAPES[shape],
        image_size=SIZE,
        patch_size=16,
        num_labels=classes,
        id2label=names,
        label2id={v: k for k, v in names.items()},
    )
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=MEAN, image_std=STD).save_pretrained(
        path
    )
    return path


def run_recipe(
    recipe: str,
    data: Path,
    model: Path,
    work: Path,
    batch: int,
    epochs: float,
    seed: int,
    extra: tuple[str, ...] = (),
    tag: str | None = None,
) -> dict[str, Any]:
    """Runs one recipe in a fresh process (``extra`` arguments appended); returns its wall time, accuracy and
    what it reported."""
    tag = tag or recipe
    out = work / f"{tag}-run"
    result_file = work / f"{tag}.json"
    result_file.unlink(missing_ok=True)
    common = ["--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", str(batch)]
    if recipe == "guide":
        cmd = [sys.executable, str(Path(__file__).with_name("guide_recipe.py")), "--data", str(data)]
        cmd += ["--model", str(model), "--output", str(out), "--batch", str(batch), "--epochs", str(epochs)]
        cmd += ["--seed", str(seed), "--json", str(result_file), *extra]
    else:
        cmd = [sys.executable, "-m", "deltatune", "train", "--model", str(model), "--dataset", str(data)]
        cmd += ["--output_dir", str(out), "--overwrite_output_dir", "--num_train_epochs", str(epochs)]
        cmd += [*common, "--gradient_accumulation_steps", "1", "--seed", str(seed), *extra]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - t0
    log = work / f"{tag}.log"
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} recipe failed (exit {proc.returncode}); see {log}")
    if recipe == "guide":
        reported = json.loads(result_file.read_text())
    else:
        metrics = json.loads((out / "metrics.json").read_text())
        reported = {
            "accuracy": metrics["accuracy"],
            "train_runtime_s": metrics["train_time_s"],
            "train_samples_per_second": metrics["train"].get("train_samples_per_second"),
            "precision": metrics["precision"],
            "epochs": [h for h in metrics["history"] if "train_samples_per_second_epoch" in h],
        }
        precision_line = next(
            (ln for ln in proc.stderr.splitlines() if "precision: " in ln and "automatic" in ln), ""
        )
        reported["precision_reason"] = precision_line.split("precision: ", 1)[-1]
    return {"wall_s": wall, **reported, "command": " ".join(cmd)}


def compare_runs(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Whole runs of both recipes, ``args.rounds`` interleaved rounds."""
    work = args.data.resolve() / "work"
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.data.resolve() / "models", args.model_shape, args.classes)
    print(f"model: {model} (ViT-{args.model_shape} shape, random weights, seed 0)")
    runs: dict[str, list[dict[str, Any]]] = {"guide": [], "deltatune": []}
    for rnd in range(args.rounds):
        for recipe in list(runs)[rnd % 2 :] + list(runs)[: rnd % 2]:
            print(f"round {rnd + 1}: {recipe} ...", flush=True)
            result = run_recipe(recipe, root, model, work, args.batch, args.epochs, args.seed)
            print(f"  {result['wall_s']:.1f} s, accuracy {result['accuracy']:.4f}")
            runs[recipe].append(result)
    med = {r: statistics.median(x["wall_s"] for x in v) for r, v in runs.items()}
    train_med = {r: statistics.median(x["train_runtime_s"] for x in v) for r, v in runs.items()}
    acc = {r: statistics.median(x["accuracy"] for x in v) for r, v in runs.items()}
    print(
        f"\nWhole run: one epoch, batch {args.batch}, ViT-{args.model_shape} shape, "
        f"{args.n_train} train + {args.n_val} validation JPEGs of {args.image_size} px "
        f"(median of {args.rounds} interleaved round(s))"
    )
    print("| recipe | wall time (s) | Trainer train_runtime (s) | accuracy | precision |")
    print("|---|---:|---:|---:|---|")
    for r in runs:
        print(f"| {r} | {med[r]:.1f} | {train_med[r]:.1f} | {acc[r]:.4f} | {runs[r][-1]['precision']} |")
    print(
        f"speed-up (guide / deltatune): wall {med['guide'] / med['deltatune']:.2f}x, "
        f"train_runtime {train_med['guide'] / train_med['deltatune']:.2f}x; "
        f"accuracy difference {100 * (acc['deltatune'] - acc['guide']):+.1f} points"
    )
    if runs["deltatune"] and runs["deltatune"][-1].get("precision_reason"):
        print(f"deltatune precision: {runs['deltatune'][-1]['precision_reason']}")
    return {
        "runs": runs,
        "median_wall_s": med,
        "median_train_runtime_s": train_med,
        "median_accuracy": acc,
        "speedup_wall": med["guide"] / med["deltatune"],
        "speedup_train_runtime": train_med["guide"] / train_med["deltatune"],
        "accuracy_difference_points": 100 * (acc["deltatune"] - acc["guide"]),
    }


def data_path(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Images/s of both data paths, ``args.repeats`` interleaved epochs each."""
    torch.set_num_threads(args.threads)
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
    for rnd in range(args.repeats):
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
        f"{args.workers} workers, {torch.get_num_threads()} torch threads; median of {args.repeats} interleaved epochs)"
    )
    print("| split | guide (torchvision per example) | deltatune fast path | speed-up |")
    print("|---|---:|---:|---:|")
    for split in ("train", "validation", "all"):
        g, d = medians["guide"][split], medians["deltatune"][split]
        print(f"| {split} | {g:.0f} | {d:.0f} | {d / g:.2f}x |")
    return {
        "images_per_s": rates,
        "median_images_per_s": medians,
        "speedup": {s: medians["deltatune"][s] / medians["guide"][s] for s in ("train", "validation", "all")},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "train", "data"], default="all", help="what to measure")
    p.add_argument("--data", type=Path, default=Path("runs/e2e_jpegs"), help="where the generated data go")
    p.add_argument("--train-images", type=int, default=None, help="default 1000 (200 with --quick)")
    p.add_argument("--val-images", type=int, default=None, help="default 200 (50 with --quick)")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=float, default=1.0, help="whole runs: training epochs")
    p.add_argument("--seed", type=int, default=42, help="whole runs: training seed")
    p.add_argument(
        "--model-shape", choices=sorted(MODEL_SHAPES), default="small", help="whole runs: ViT shape"
    )
    p.add_argument("--rounds", type=int, default=1, help="whole runs: interleaved rounds (default 1)")
    p.add_argument("--workers", type=int, default=0, help="data path: DataLoader workers, both recipes")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="data path: torch threads (default 1, as in DataLoader workers)",
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="data path: interleaved epochs (default 3; 2 with --quick)"
    )
    p.add_argument(
        "--draft",
        choices=["image", "crop", "none"],
        default="image",
        help="data path: fast path's JPEG draft",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: fewer images and rounds")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    args.n_train = args.train_images or (200 if args.quick else 1000)
    args.n_val = args.val_images or (50 if args.quick else 200)
    args.repeats = args.repeats or (2 if args.quick else 3)
    root = args.data.resolve() / f"v2_{args.n_train}_{args.n_val}_{args.classes}_{args.image_size}"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    warnings.filterwarnings("ignore")

    t0 = time.perf_counter()
    generate(root, args.n_train, args.n_val, args.classes, args.image_size)
    print(
        f"data: {root} ({args.n_train} train + {args.n_val} validation JPEGs, {args.image_size} px; "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    result: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "root": str(root)}
    if args.part in ("all", "train"):
        result["whole_run"] = compare_runs(args, root)
    if args.part in ("all", "data"):
        result["data_path"] = data_path(args, root)
    result["load_avg"] = os.getloadavg()
    result["cpu"] = _cpu_name()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nJSON written to {args.json}")
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            name = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "unknown")
    except OSError:
        name = "unknown"
    return f"{name}, {os.cpu_count()} logical CPUs"


if __name__ == "__main__":
    main()
