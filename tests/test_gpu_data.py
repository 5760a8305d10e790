"""The device-side data path (``--data_pipeline gpu``) run on the CPU device: same augmentation semantics as
the fast CPU path, EXIF orientation, non-JPEG fallback, bad files; the automatic choice; the DataLoader
defaults for accelerators; and the per-epoch throughput record."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import QUIET_CPU_ARGS, save_tiny_vit_dir
from transformers import ViTImageProcessor

from deltatune.train.dataloading import apply_accelerator_defaults, loader_settings_left_alone
from deltatune.vision.fast import FastImageTransform
from deltatune.vision.gpu import EncodedImageTransform, choose_pipeline, encoded_rows
from deltatune.vision.transforms import TransformedDataset

PROCESSOR = ViTImageProcessor(size={"height": 48, "width": 48})


def _smooth(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth RGB gradient (resampling filters agree closely on it), different per seed."""
    yy, xx = np.mgrid[0:height, 0:width]
    phase = seed * 37

    def fold(v: np.ndarray) -> np.ndarray:  # a triangle wave: wraps around 255 without a step edge
        return 255 - np.abs(v % 510 - 255)

    return np.stack(
        [
            fold(xx * 255 // width + phase),
            yy * 255 // height,
            fold((xx + yy) * 127 // (width + height) + phase),
        ],
        -1,
    ).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """JPEGs in several sizes and EXIF orientations, a grayscale JPEG and a PNG."""
    root = tmp_path_factory.mktemp("gpu-images")
    paths = []
    for i, (w, h, orientation) in enumerate(
        [
            (160, 120, 1),
            (120, 160, 6),
            (140, 140, 3),
            (128, 100, 8),
            (100, 128, 2),
            (150, 110, 5),
            (110, 150, 7),
        ]
    ):
        image = Image.fromarray(_smooth(w, h, i))
        exif = image.getexif()
        exif[0x0112] = orientation
        path = root / f"{i}.jpg"
        image.save(path, quality=95, exif=exif)
        paths.append(str(path))
    Image.fromarray(_smooth(90, 70, 9)).convert("L").save(root / "gray.jpg", quality=95)
    Image.fromarray(_smooth(90, 70, 10)).save(root / "plain.png")
    # formats the device decoder must not get, decoded in the worker as the CPU path decodes them
    rgba = Image.fromarray(_smooth(80, 60, 11)).convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(60)[:, None] * 4 + np.zeros((60, 80))).astype(np.uint8)))
    rgba.save(root / "alpha.png")
    Image.fromarray(_smooth(70, 50, 12)[..., 0].astype(np.uint16) * 250).save(root / "deep.png")  # 16-bit
    Image.fromarray(_smooth(64, 48, 13)).save(root / "plain.bmp")
    Image.fromarray(_smooth(64, 48, 14)).save(root / "plain.tiff")
    frames = [
        Image.fromarray(_smooth(60, 40, 15 + k)).convert("P", palette=Image.Palette.ADAPTIVE)
        for k in range(2)
    ]
    frames[0].save(root / "moving.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(_smooth(72, 56, 17)).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    trailing = root / "trailing.jpg"  # bytes after the end-of-image marker (motion photos, padded uploads)
    Image.fromarray(_smooth(84, 64, 18)).save(trailing, quality=95)
    trailing.write_bytes(trailing.read_bytes() + b"\x00" * 7 + b"extra data after EOI")
    others = [
        "gray.jpg",
        "plain.png",
        "alpha.png",
        "deep.png",
        "plain.bmp",
        "plain.tiff",
        "moving.gif",
        "cmyk.jpg",
    ]
    return [*paths, *(str(root / name) for name in others), str(trailing)]


def test_device_path_matches_the_fast_path(images: list[str]) -> None:
    """Same random crop boxes and flips (same RNG draws), same filter family: within ~1 intensity level."""
    train = True  # the device path only trains (evaluation has one path, deltatune.vision.preprocess)
    encoded = EncodedImageTransform.from_processor(PROCESSOR)
    fast = FastImageTransform.from_processor(PROCESSOR, train=train, draft=None)
    torch.manual_seed(0)
    rows = [{"pixel_values": encoded(p), "labels": i} for i, p in enumerate(images)]
    torch.manual_seed(0)
    reference = fast.collate()([{"pixel_values": fast(p), "labels": i} for i, p in enumerate(images)])
    collate = encoded.collate()
    collated = collate(rows)
    encoded = collated["encoded_images"]
    assert encoded.blob.dim() == 1 and len(encoded) == len(images), "all bytes in one storage"
    assert sum(n > 0 for _, n in encoded.spans) == 8, "only the 8 YCbCr JPEGs go to the device decoder"
    batch = collate.device_transform(collated, "cpu")
    assert batch["pixel_values"].shape == (len(images), 3, 48, 48)
    assert torch.equal(batch["labels"], reference["labels"])
    # Differences come from the JPEG decoders (chroma upsampling differs between libraries by a few levels
    # at some pixels), from the CPU path rounding eval boxes to whole pixels, and from box vs triangle
    # antialiasing: small on average, a few levels at worst.
    levels = ((batch["pixel_values"] - reference["pixel_values"]).abs() * 0.5 * 255).flatten()  # ViT std 0.5
    p99 = float(levels.kthvalue(int(0.99 * levels.numel())).values)
    assert float(levels.mean()) < 0.6 and p99 < 5.0 and float(levels.max()) < 12.0, (
        float(levels.mean()),
        p99,
    )
    if train:
        flips = [r["pixel_values"].flip for r in rows]
        assert any(flips) and not all(flips), "the flip must be drawn per image"


def test_unreadable_header_is_skipped_by_the_dataset(images: list[str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(images[0]).read_bytes()[:50])
    rows = [{"image": str(broken), "label": 0}, {"image": images[1], "label": 1}]
    dataset = TransformedDataset(rows, EncodedImageTransform.from_processor(PROCESSOR))
    with pytest.warns(RuntimeWarning, match="skipped unreadable image .*broken.jpg"):
        example = dataset[0]
    assert example["labels"] == 1 and dataset.num_skipped == 1


def test_truncated_jpeg_is_dropped_from_the_batch_with_its_label(images: list[str], tmp_path: Path) -> None:
    """The header reads, the body does not decode: found on the device side, dropped with its label."""
    data = Path(images[0]).read_bytes()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(data[: len(data) // 2])
    transform = EncodedImageTransform.from_processor(PROCESSOR)
    collate = transform.collate()
    rows = [{"pixel_values": transform(p), "labels": i} for i, p in enumerate([str(broken), *images[1:3]])]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # the worker closes what it opens
        collated = collate(rows)
    with pytest.warns(RuntimeWarning, match="dropped 1 image"):
        batch = collate.device_transform(collated, "cpu")
    assert batch["pixel_values"].shape[0] == 2 and batch["labels"].tolist() == [1, 2]
    assert collate.device_transform.decode_failures == 1


def test_an_undecodable_image_is_dropped_with_its_label(images: list[str], tmp_path: Path) -> None:
    """A complete JPEG stream with a corrupt body: dropped from the batch (with its label), with a warning."""
    good = Path(images[0]).read_bytes()
    scan = good.index(b"\xff\xda") + 20  # after the start-of-scan header: the headers stay readable
    corrupt = good[:scan] + bytes(len(good) - scan - 2) + good[-2:]
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(corrupt)
    encoded = EncodedImageTransform.from_processor(PROCESSOR)
    rows = [
        {"pixel_values": encoded(p), "labels": i} for i, p in enumerate([images[1], str(path), images[2]])
    ]
    collate = encoded.collate()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collate.device_transform(collate(rows), "cpu")
    if (
        batch["pixel_values"].shape[0] == 3
    ):  # a lenient decoder may return garbage pixels instead: still a batch
        return
    assert batch["labels"].tolist() == [0, 2]
    assert any("dropped 1 image" in str(w.message) for w in caught)


def test_the_device_path_refuses_evaluation() -> None:
    with pytest.raises(ValueError, match="the gpu data path trains"):
        EncodedImageTransform.from_processor(PROCESSOR, train=False)


def test_decoded_images_are_refused_with_the_alternative() -> None:
    rows = [{"image": Image.new("RGB", (8, 8)), "label": 0}]
    with pytest.raises(ValueError, match="--data_pipeline fast"):
        encoded_rows(rows)


def test_automatic_choice(monkeypatch: pytest.MonkeyPatch, images: list[str]) -> None:
    import deltatune.vision.gpu as gpu

    rows = [{"image": p, "label": 0} for p in images]
    assert choose_pipeline("auto", "cpu", rows, 100.0, 4, 35.0)[0] == "fast"
    assert choose_pipeline("fast", "cpu", rows, None, 0, None) == ("fast", "fast (requested)")
    assert choose_pipeline("gpu", "cpu", rows, None, 0, None)[0] == "gpu"  # the CPU decoder stands in
    monkeypatch.setattr(gpu, "gpu_decode_available", lambda device: True)
    monkeypatch.setattr(gpu, "peak_tflops", lambda device: 989.0)  # an H100/H200
    # ViT-B: 35 GFLOP per image forward; the GPU trains ~3,300/s at 35% of its peak
    choice, why = choose_pipeline("auto", "cuda", rows, 150.0, 15, 35.0)
    assert choice == "gpu" and "2250 images/s" in why
    choice, _ = choose_pipeline("auto", "cuda", rows, 400.0, 15, 35.0)  # 6,000/s on the CPU: keeps up
    assert choice == "fast"
    decoded = [{"image": Image.new("RGB", (8, 8)), "label": 0}]
    assert choose_pipeline("auto", "cuda", decoded, 150.0, 15, 35.0)[0] == "fast"


def test_accelerator_loader_defaults() -> None:
    from deltatune.train import TrainingArguments

    args = TrainingArguments("unused", use_cpu=True)
    assert loader_settings_left_alone(args)
    apply_accelerator_defaults(args, cores=16, processes_per_node=1)
    assert args.dataloader_num_workers == 15 and args.dataloader_persistent_workers
    assert args.dataloader_pin_memory and args.dataloader_prefetch_factor == 4
    assert not loader_settings_left_alone(args)
    apply_accelerator_defaults(args, cores=16, processes_per_node=4)
    assert args.dataloader_num_workers == 3
    apply_accelerator_defaults(args, cores=2, processes_per_node=1)
    assert args.dataloader_num_workers == 1


@pytest.mark.slow
def test_training_through_the_device_path(images: list[str], tmp_path: Path) -> None:
    """``run_training`` with ``data_pipeline="gpu"`` (the device being the CPU here): trains, evaluates, and
    records each epoch's throughput."""
    from deltatune.tasks.image_classification import RunSpec, run_training
    from deltatune.train import TrainingArguments

    root = tmp_path / "data"
    for label in ("a", "b"):
        os.makedirs(root / label)
        for i in range(6):
            image = _smooth(64, 64, i) if label == "a" else 255 - _smooth(64, 64, i)
            Image.fromarray(image).save(root / label / f"{i}.jpg")
    model_dir = save_tiny_vit_dir(tmp_path / "vit")
    args_kw: dict[str, Any] = {**QUIET_CPU_ARGS, "num_train_epochs": 2, "per_device_train_batch_size": 4}
    args = TrainingArguments(str(tmp_path / "out"), eval_strategy="epoch", save_strategy="no", **args_kw)
    spec = RunSpec(
        method="lora", model=model_dir, dataset=str(root), data_pipeline="gpu", validation_split=0.25
    )
    result = run_training(spec, args, num_threads=1, precision="fp32")
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    epochs = [h for h in result.metrics["history"] if "train_samples_per_second_epoch" in h]
    assert len(epochs) == 2 and all(h["train_samples_per_second_epoch"] > 0 for h in epochs)


@pytest.mark.parametrize("utilization", [None, 87.0])
def test_epoch_throughput_reaches_the_console_only_with_a_gpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, utilization: float | None
) -> None:
    """samples/s is already a column of the console's epoch line; a GPU's utilisation is news there. The
    record goes to the run's history either way (and train.log, which keeps DEBUG)."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from deltatune.train import throughput

    monkeypatch.setattr(throughput, "gpu_utilization", lambda device=None: utilization)
    monkeypatch.setattr(
        throughput,
        "_Sampler",
        lambda device: SimpleNamespace(start=lambda: SimpleNamespace(stop=lambda: utilization)),
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    callback, state = throughput.ThroughputCallback(), TrainerState()
    args = SimpleNamespace(train_batch_size=4, gradient_accumulation_steps=1, world_size=1)
    with caplog.at_level(logging.DEBUG, logger="deltatune.train.throughput"):
        callback.on_epoch_begin(args, state, TrainerControl())  # type: ignore[arg-type]
        state.global_step, state.epoch = 5, 1.0
        callback.on_epoch_end(args, state, TrainerControl())  # type: ignore[arg-type]
    (record,) = [r for r in caplog.records if "samples/s" in r.getMessage()]
    assert record.levelno == (logging.DEBUG if utilization is None else logging.INFO)
    assert ("GPU 87% busy" in record.getMessage()) == (utilization is not None)
    assert state.log_history[-1]["step"] == 5 and state.log_history[-1].get("gpu_utilization") == utilization


def test_epoch_samples_count_the_images_seen_not_padded_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """12 images at batch 4 x accumulation 4 are one optimiser step of 12 images, not 16 (the file said 33%
    more images/s than the console)."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from deltatune.train import throughput

    clock = iter([10.0, 11.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(throughput, "gpu_utilization", lambda device=None: None)
    callback, state = throughput.ThroughputCallback(), TrainerState()
    args = SimpleNamespace(train_batch_size=4, gradient_accumulation_steps=4, world_size=1)
    loader = SimpleNamespace(dataset=list(range(12)))
    callback.on_epoch_begin(args, state, TrainerControl(), train_dataloader=loader)  # type: ignore[arg-type]
    state.global_step, state.epoch = 1, 1.0
    callback.on_epoch_end(args, state, TrainerControl())  # type: ignore[arg-type]
    assert state.log_history[-1]["train_samples_per_second_epoch"] == 12.0
