"""One preprocessing from a run to deployment: the run's final accuracy, ``evaluate``'s, ``predict``'s top-1 and
a merged model in transformers' own ``pipeline("image-classification")`` agree, on a folder of mixed aspect
ratios with transparent (RGBA), palette and EXIF-rotated images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import save_tiny_vit_dir, tiny_train_argv

from deltatune.cli import main
from deltatune.tasks.inference import load_trained, predict_images
from deltatune.vision import load_image_dataset

SHAPES = [(40, 24), (24, 56), (32, 32), (70, 30), (33, 47)]  # (width, height)


def write_mixed_folder(root: Path, per_class: int = 8) -> Path:
    """Three classes of images of several aspect ratios; every third is RGBA with random colour under a
    transparent half (composited on white it looks different from the pipeline's alpha-dropping view), one
    is a palette image and one carries an EXIF rotation."""
    rng = np.random.default_rng(0)
    for c, kind in enumerate(("bright", "dark", "red")):
        folder = root / kind
        folder.mkdir(parents=True)
        for i in range(per_class):
            width, height = SHAPES[(i + c) % len(SHAPES)]
            pixels = rng.integers(0, 80, (height, width, 3)).astype(np.uint8)
            pixels += np.uint8(150) if kind == "bright" else np.uint8(0)
            if kind == "red":
                pixels[..., 0] += 170
            pixels[:, : width // 3] = rng.integers(0, 255, (height, width // 3, 3))  # a busy left third
            if i % 3 == 0:
                alpha = np.full((height, width, 1), 255, np.uint8)
                alpha[:, : width // 2] = 0
                Image.fromarray(np.concatenate([pixels, alpha], axis=2), "RGBA").save(folder / f"{i}.png")
            elif i == 1:
                Image.fromarray(pixels).convert("P").save(folder / f"{i}.png")
            elif i == 2:
                exif = Image.Exif()
                exif[0x0112] = 6  # rotated 90°
                Image.fromarray(pixels).save(folder / f"{i}.jpg", exif=exif, quality=95)
            else:
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("one-truth")
    save_tiny_vit_dir(root / "model")
    write_mixed_folder(root / "data")
    run = root / "run"
    # a few epochs at a high rate: a model that tells the classes apart, so preprocessing moves its scores
    assert main([*tiny_train_argv(root, run), "--num_train_epochs", "6", "--learning_rate", "0.01"]) == 0
    return {"root": root, "run": run}


def _eval_files(run: Path) -> list[str]:
    record = json.loads((run / "deltatune_run.json").read_text())
    bundle = load_image_dataset(
        record["dataset"], validation_split=record["validation_split"], seed=record["seed"]
    )
    return list(bundle.eval.files)


def test_run_evaluate_predict_and_merged_pipeline_agree(mixed_run: dict[str, Path]) -> None:
    from transformers import pipeline

    run, root = mixed_run["run"], mixed_run["root"]
    run_accuracy = json.loads((run / "eval_results.json").read_text())["eval_accuracy"]
    assert main(["evaluate", "--adapter", str(run), "--output_dir", str(root / "ev")]) == 0
    evaluated = json.loads((root / "ev" / "eval_results.json").read_text())
    files = _eval_files(run)
    assert evaluated["eval_samples"] == len(files) > 0
    assert evaluated["eval_accuracy"] == run_accuracy
    run_metrics = json.loads((run / "metrics.json").read_text())
    assert evaluated["confusion_matrix"] == run_metrics["confusion_matrix"]
    ran = json.loads((run / "eval_results.json").read_text())
    assert evaluated["per_class_accuracy"] == ran["per_class_accuracy"]  # one report, the same classes

    predictions = predict_images(load_trained(str(run)), files, top_k=3, progress=False)
    top1 = [p["predictions"][0]["label"] for p in predictions]
    truth = [Path(f).parent.name for f in files]
    assert sum(a == b for a, b in zip(top1, truth, strict=True)) / len(files) == run_accuracy
    assert len(set(top1)) > 1  # the model separates the classes: a constant answer would agree by chance

    assert main(["merge", "--adapter", str(run), "--output", str(root / "merged")]) == 0
    classify = pipeline("image-classification", model=str(root / "merged"), device="cpu")
    for path, predicted in zip(files, predictions, strict=True):
        piped = {r["label"]: r["score"] for r in classify(path, top_k=3)}
        assert next(iter(piped)) == predicted["predictions"][0]["label"], path
        for pred in predicted["predictions"]:
            assert abs(piped[pred["label"]] - pred["score"]) < 1e-3, path
    saved = json.loads((root / "merged" / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "BitImageProcessor"
    assert saved["size"] == {"shortest_edge": 32} and saved["crop_size"] == {"height": 32, "width": 32}


def test_adapter_folder_holds_the_evaluation_processor(mixed_run: dict[str, Path]) -> None:
    saved = json.loads((mixed_run["run"] / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "BitImageProcessor"
    assert saved["resample"] == 2 and saved["do_center_crop"] is True
    assert os.path.isfile(mixed_run["run"] / "adapter_config.json")
