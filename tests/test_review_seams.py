"""Seams between the run and the commands that read it: ``metrics.json`` is a result file (its failure fails the
run), the run's card is a peft card, ``evaluate`` reports per class and caps samples as the run does, a saved
processor that the evaluation transform changes is said, and ``predict`` preprocesses a chunk in one call."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny import save_tiny_vit_dir, write_image_folder

from deltatune.tasks import report

HUB_BASE = "google/vit-base-patch16-224"


def _front(card: str) -> dict[str, Any]:
    front = yaml.safe_load(card.split("---\n", 2)[1])
    assert isinstance(front, dict)
    return front


# ---- 1. metrics.json is written with the result files ---------------------------------------------
def test_metrics_json_is_a_result_file_whose_failure_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = {"do_train": False, "do_eval": False, "name": "lora"}
    report.write_results(None, metrics, str(tmp_path))
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics

    def full_disk(path: str, data: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        report.write_results(None, metrics, str(tmp_path / "other"))


# ---- 2. cards ---------------------------------------------------------------------------------------
def _run_info(method: str) -> dict[str, Any]:
    return {
        "method": method,
        "base_model": HUB_BASE,
        "dataset": "beans",
        "trainable_params": 10,
        "all_params": 100,
        "trainable_percent": 10.0,
    }


def test_run_card_is_a_peft_card_with_the_adapter_metadata() -> None:
    from deltatune.methods.lora import LoraConfig
    from deltatune.model_card import card_metadata

    front = _front(report.model_card(_run_info("lora")))
    assert front["library_name"] == "peft"  # the files are PEFT's format, as save_pretrained's card says
    assert front["pipeline_tag"] == "image-classification" and front["base_model"] == HUB_BASE
    assert front["tags"][:4] == ["deltatune", "peft", "image-classification", "lora"]
    assert set(card_metadata(LoraConfig(), HUB_BASE)["tags"]) <= set(front["tags"])
    assert "base_model:adapter:" + HUB_BASE in front["tags"]
    dora = _front(report.model_card(_run_info("dora")))
    assert "dora" in dora["tags"] and "# DoRA adapter" in report.model_card(_run_info("dora"))


def test_merged_card_tags_the_registry_name(tmp_path: Path) -> None:
    from deltatune.methods.ia3 import IA3Config

    config = IA3Config(base_model_name_or_path=HUB_BASE)
    report.write_merged_model_card(str(tmp_path), str(tmp_path), config, 3)
    text = (tmp_path / "README.md").read_text()
    front = _front(text)
    assert front["tags"] == ["deltatune", "image-classification", "ia3", "merged"]
    assert "with a IA³ adapter merged in" in text  # the display name stays in the prose


def test_display_name_of_a_method_name_or_a_baseline() -> None:
    from deltatune.model_card import method_display_name

    assert method_display_name("lora") == "LoRA" and method_display_name("full") == "full"


# ---- 3. one per-class report ----------------------------------------------------------------------
def test_streaming_report_lists_every_class_as_the_run_does() -> None:
    from deltatune._files import strict_json
    from deltatune.tasks.evaluation import StreamingReport
    from deltatune.tasks.image_classification import confusion_metrics
    from deltatune.tasks.results import EvalPredictions

    names = ["a", "b", "c"]
    labels = np.array([0, 0, 2, 2, 2])  # no image of "b"
    predicted = np.array([0, 1, 2, 0, 2])
    streaming = StreamingReport(names)
    streaming.add(
        torch.nn.functional.one_hot(torch.from_numpy(predicted), 3).float(), torch.from_numpy(labels)
    )
    ran = confusion_metrics(EvalPredictions(predicted, labels, np.ones(5)), names)
    evaluated = streaming.report().to_dict()
    assert (
        strict_json(evaluated["per_class_accuracy"])
        == ran["per_class_accuracy"]
        == {
            "a": 0.5,
            "b": None,
            "c": 2 / 3,
        }
    )
    assert evaluated["confusion_matrix"] == ran["confusion_matrix"]
    assert any("'b'" in note for note in evaluated["notes"])


@pytest.fixture(scope="module")
def run_missing_a_class(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run whose validation folder has no image of one class."""
    from deltatune.cli import main

    root = tmp_path_factory.mktemp("seams")
    save_tiny_vit_dir(root / "model")
    write_image_folder(root / "train", per_class=4)
    val = Path(write_image_folder(root / "val", per_class=2, seed=1))
    shutil.rmtree(val / "dark")
    run = root / "run"
    argv = [
        "train",
        "--model",
        str(root / "model"),
        "--dataset",
        str(root / "train"),
        "--output_dir",
        str(run),
    ]
    argv += ["--validation_dir", str(val), "--num_train_epochs", "1", "--per_device_train_batch_size", "4"]
    assert main([*argv, "--use_cpu", "--disable_tqdm", "true", "--method", "lora", "--r", "2"]) == 0
    return run


def test_evaluate_reports_each_class_as_the_run_did(run_missing_a_class: Path, tmp_path: Path) -> None:
    from deltatune.cli import main

    assert main(["evaluate", "--adapter", str(run_missing_a_class), "--output_dir", str(tmp_path)]) == 0
    ran = json.loads((run_missing_a_class / "eval_results.json").read_text())
    evaluated = json.loads((tmp_path / "eval_results.json").read_text())
    assert ran["per_class_accuracy"]["dark"] is None
    for key in ("per_class_accuracy", "confusion_matrix", "class_names"):
        assert evaluated[key] == ran[key], key


# ---- 4. --max_eval_samples on a folder picks the run's images ----------------------------------------
def test_evaluate_caps_a_folder_as_the_run_does(tmp_path: Path) -> None:
    from deltatune.tasks.evaluation import evaluation_data
    from deltatune.vision import is_image_folder, load_image_dataset

    write_image_folder(tmp_path / "data" / "train", per_class=2)
    write_image_folder(tmp_path / "data" / "validation", per_class=10, seed=1)
    root = str(tmp_path / "data")
    assert is_image_folder(root) and not is_image_folder(tmp_path / "missing")
    run = load_image_dataset(root, seed=3, max_eval_samples=7)
    data = evaluation_data(run.class_names, {"seed": 3}, dataset=root, max_eval_samples=7)
    assert list(data.rows.files) == list(run.eval.files) and len(run.eval.files) == 7


# ---- 5. a saved processor the evaluation transform changes is said --------------------------------
def test_a_converted_processor_is_said_in_one_line(
    run_missing_a_class: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import ViTImageProcessor

    from deltatune.tasks.inference import load_trained

    with caplog.at_level(logging.WARNING, logger="deltatune"):
        load_trained(str(run_missing_a_class))
    assert "evaluation transform" not in caplog.text  # the run's own processor: nothing changes
    copy = tmp_path / "adapter"
    shutil.copytree(run_missing_a_class, copy)
    (copy / "preprocessor_config.json").unlink()
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(copy)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        trained = load_trained(str(copy))
    lines = [r.getMessage() for r in caplog.records if "evaluation transform" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "size {'height': 32, 'width': 32} -> {'shortest_edge': 32}" in lines[0]
    assert type(trained.image_processor).__name__.startswith("BitImageProcessor")


# ---- 8. a chunk is preprocessed in one processor call, with the same pixels ---------------------------
@pytest.mark.parametrize("backend", ["BitImageProcessor", "BitImageProcessorPil"])
def test_batched_preprocessing_equals_one_image_at_a_time(backend: str) -> None:
    import transformers

    from deltatune.vision.preprocess import evaluation_processor, preprocess, preprocess_batch

    processor = evaluation_processor({"size": {"height": 32, "width": 32}})
    processor = getattr(transformers, backend)(**processor.to_dict())
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for w, h in [(40, 24), (24, 56), (32, 32)]
    ]
    batched = preprocess_batch(processor, images)
    assert torch.equal(batched, torch.stack([preprocess(processor, image) for image in images]))


# ---- 10. our backend is the one transformers' AutoImageProcessor (and so the pipeline) picks ------------
@pytest.mark.parametrize("torchvision", [True, False])
def test_evaluation_processor_backend_is_the_auto_one(
    torchvision: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.utils
    from transformers import AutoImageProcessor
    from transformers.models.auto import image_processing_auto

    from deltatune.vision.preprocess import evaluation_processor

    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: torchvision)
    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: torchvision)
    ours = evaluation_processor({"size": {"height": 32, "width": 32}})
    ours.save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is type(ours)
    assert type(ours).__name__ == ("BitImageProcessor" if torchvision else "BitImageProcessorPil")


# ---- 6. the gpu path's worker decodes a transparent image as the CPU path does (alpha dropped) -----------
def test_gpu_path_drops_alpha_as_the_cpu_path(tmp_path: Path) -> None:
    from deltatune.vision.gpu import EncodedImageTransform
    from deltatune.vision.preprocess import load_rgb

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (20, 30, 4), dtype=np.uint8)
    pixels[:, :10, 3] = 0  # a transparent third, whose colour convert("RGB") keeps
    Image.fromarray(pixels, "RGBA").save(tmp_path / "alpha.png")
    encoded = EncodedImageTransform.from_processor({"size": {"height": 16, "width": 16}})(
        tmp_path / "alpha.png"
    )
    assert encoded.data is None and encoded.pixels is not None
    cpu = torch.from_numpy(np.asarray(load_rgb(tmp_path / "alpha.png"))).permute(2, 0, 1)
    assert torch.equal(encoded.pixels, cpu) and torch.equal(
        cpu, torch.from_numpy(pixels[..., :3]).permute(2, 0, 1)
    )


# ---- 9. malloc_trim is looked up once per process ------------------------------------------------------
def test_release_freed_memory_looks_the_library_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes.util

    from deltatune.tasks import evaluation

    lookups: list[str] = []
    real = ctypes.util.find_library
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: lookups.append(name) or real(name))
    evaluation._malloc_trim.cache_clear()
    for _ in range(3):
        evaluation.release_freed_memory()
    assert lookups == ["c"]
    evaluation._malloc_trim.cache_clear()


# ---- 7. load_rgb: one pixel check per image, a PIL image handed in checked too ---------------------------
def test_load_rgb_checks_an_image_handed_in_and_returns_a_new_rgb_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltatune.vision import preprocess

    image = Image.new("RGB", (40, 40), (10, 20, 30))
    decoded = preprocess.load_rgb(image)
    assert decoded is not image and decoded.mode == "RGB" and decoded.tobytes() == image.tobytes()
    image.save(tmp_path / "a.png")
    checks: list[str] = []
    monkeypatch.setattr(preprocess, "check_image_pixels", lambda im, name: checks.append(name))
    preprocess.load_rgb(tmp_path / "a.png")
    assert checks == [str(tmp_path / "a.png")]  # once, by open_image
    monkeypatch.undo()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 - 1)
    with pytest.raises(ValueError, match="refused before decoding"):
        preprocess.load_rgb(image)
