"""deltatune.vision: dataset loading, label maps, transforms, the on-the-fly wrapper, collate, offline assets."""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deltatune.vision import (
    OFFLINE_BACKBONE_DIR,
    ImageTransform,
    TransformedDataset,
    build_transforms,
    collate_fn,
    detect_columns,
    load_image_dataset,
    offline_default_model_dir,
    resolve_size,
    stratified_split,
    to_rgb,
)

STATS = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}
REPO = Path(__file__).resolve().parents[1]


def _image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.quantize(colors=16)
    return rgb.convert(mode)


def _make_folder(root: Path, per_class: int = 4, corrupt: bool = True) -> Path:
    """root/<cat|dog|owl>/*.png in RGB, L, RGBA and P modes; one corrupt file in dog/."""
    modes = ["RGB", "L", "RGBA", "P"]
    for c, name in enumerate(["owl", "cat", "dog"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            _image(modes[i % len(modes)], (20 + 3 * i, 24), seed=10 * c + i).save(folder / f"{i}.png")
        (folder / "notes.txt").write_text("not an image")
    if corrupt:
        (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return root


# ---- loading -----------------------------------------------------------------------------------------------


def test_imagefolder_label_maps_split_and_modes(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "pets", per_class=8)
    bundle = load_image_dataset(str(root), validation_split=0.25, seed=0)
    assert bundle.label2id == {"cat": 0, "dog": 1, "owl": 2}
    assert bundle.id2label == {0: "cat", 1: "dog", 2: "owl"}
    # 8 or 9 images per class (dog has the corrupt file); ~25% of each class goes to eval
    assert len(bundle.train) + len(bundle.eval) == 25
    assert sorted({bundle.eval[i]["label"] for i in range(len(bundle.eval))}) == [0, 1, 2]
    assert set(bundle.train.files).isdisjoint(bundle.eval.files)
    row = bundle.train[0]
    assert isinstance(row["image"], Image.Image) and isinstance(row["label"], int)
    again = load_image_dataset(str(root), validation_split=0.25, seed=0)
    assert again.eval.files == bundle.eval.files  # the carved split is deterministic


def test_corrupt_image_is_skipped_with_a_counted_warning(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "pets")
    bundle = load_image_dataset(str(root), validation_split=0.5, seed=0)
    everything = TransformedDataset(
        bundle.train.subset(range(len(bundle.train))), build_transforms(STATS, train=False)
    )
    everything.dataset.files += bundle.eval.files
    everything.dataset.labels += bundle.eval.labels
    broken = everything.dataset.files.index(str(root / "dog" / "broken.png"))
    with pytest.warns(RuntimeWarning, match=r"skipped unreadable image '.*broken\.png' \("):
        row = everything[broken]
    assert row["pixel_values"].shape == (3, 32, 32)
    assert row["labels"] == everything.dataset.labels[(broken + 1) % len(everything)]  # the next readable one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = [everything[i] for i in range(len(everything))]
    assert everything.num_skipped == 2 and everything.skipped == [str(root / "dog" / "broken.png")]
    assert all(
        r["pixel_values"].shape == (3, 32, 32) and r["pixel_values"].dtype == torch.float32 for r in rows
    )


def test_all_unreadable_raises(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            (tmp_path / name / f"{i}.jpg").write_bytes(b"garbage")
    bundle = load_image_dataset(str(tmp_path), validation_split=0.5)
    data = TransformedDataset(bundle.train, build_transforms(STATS, train=True))
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="no readable image"):
        warnings.simplefilter("ignore")
        data[0]


def test_split_layout_and_empty_split_errors(tmp_path: Path) -> None:
    _make_folder(tmp_path / "ds" / "train", corrupt=False)
    _make_folder(tmp_path / "ds" / "validation", per_class=2, corrupt=False)
    bundle = load_image_dataset(str(tmp_path / "ds"))
    assert (len(bundle.train), len(bundle.eval)) == (12, 6)
    assert bundle.label2id == {"cat": 0, "dog": 1, "owl": 2}

    _make_folder(tmp_path / "empty_eval" / "train", corrupt=False)
    (tmp_path / "empty_eval" / "val" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"eval split .* is empty"):
        load_image_dataset(str(tmp_path / "empty_eval"))

    (tmp_path / "nothing" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders with images"):
        load_image_dataset(str(tmp_path / "nothing"))

    _make_folder(tmp_path / "unknown_class" / "train", corrupt=False)
    (tmp_path / "unknown_class" / "test" / "ferret").mkdir(parents=True)
    _image("RGB", (8, 8), 0).save(tmp_path / "unknown_class" / "test" / "ferret" / "0.png")
    with pytest.raises(ValueError, match="not among the training classes"):
        load_image_dataset(str(tmp_path / "unknown_class"))

    with pytest.raises(ValueError, match="does not exist"):
        load_image_dataset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="validation_split"):
        load_image_dataset(str(tmp_path / "nothing" / ".."), validation_split=1.5)


def test_max_samples_subsets_are_random_not_the_first_class(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "pets", per_class=8, corrupt=False)
    bundle = load_image_dataset(str(root), validation_split=0.25, max_train_samples=6, max_eval_samples=2)
    assert (len(bundle.train), len(bundle.eval)) == (6, 2)
    assert len({bundle.train[i]["label"] for i in range(6)}) > 1


def test_stratified_split_keeps_every_class() -> None:
    labels = [0] * 10 + [1] * 20 + [2] * 1
    train, evaluation = stratified_split(labels, 0.2, seed=3)
    assert sorted(train + evaluation) == list(range(31))
    assert [labels[i] for i in evaluation].count(0) == 2
    assert [labels[i] for i in evaluation].count(1) == 4
    assert 30 in train  # a single-example class stays in train


# ---- column detection and hub-style datasets -------------------------------------------------------------------


def test_detect_columns_by_name_and_errors() -> None:
    assert detect_columns(["img", "fine_label", "coarse_label"]) == ("img", "fine_label")
    assert detect_columns(["Image", "Labels"]) == ("Image", "Labels")
    assert detect_columns(["photo_x", "y"], image_column="photo_x") == ("photo_x", "y")
    with pytest.raises(
        ValueError, match=r"could not find the image column.*\['pic', 'label'\].*--image_column"
    ):
        detect_columns(["pic", "label"])
    with pytest.raises(
        ValueError, match=r"could not find the label column.*\['image', 'kind'\].*--label_column"
    ):
        detect_columns(["image", "kind"])
    with pytest.raises(ValueError, match=r"label column 'klass' not found.*columns found.*--label_column"):
        detect_columns(["image", "label"], label_column="klass")


def test_detect_columns_by_feature_type() -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"picture_bytes": datasets.Image(), "kind": datasets.ClassLabel(names=["a", "b"])}
    )
    assert detect_columns(list(features), features) == ("picture_bytes", "kind")


def test_saved_hub_dataset_with_classlabel_and_string_labels(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    images = [_image(["RGB", "L", "RGBA", "P"][i % 4], (16, 12), i) for i in range(20)]
    features = datasets.Features(
        {"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["x", "y"])}
    )
    ds = datasets.Dataset.from_dict(
        {"img": images, "fine_label": [i % 2 for i in range(20)]}, features=features
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    bundle = load_image_dataset(str(tmp_path / "saved"), validation_split=0.2, seed=1)
    assert (bundle.image_column, bundle.label_column) == ("img", "fine_label")
    assert bundle.id2label == {0: "x", 1: "y"}
    assert (len(bundle.train), len(bundle.eval)) == (16, 4)
    assert sorted(bundle.eval[i]["label"] for i in range(4)) == [0, 0, 1, 1]  # stratified
    row = bundle.train[0]
    assert isinstance(row["image"], Image.Image) and row["label"] in (0, 1)

    split = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"image": images[:6], "animal": ["owl", "cat", "dog"] * 2}),
            "test": datasets.Dataset.from_dict({"image": images[6:9], "animal": ["cat", "cat", "owl"]}),
        }
    )
    split.save_to_disk(str(tmp_path / "strings"))
    with pytest.raises(ValueError, match=r"columns found: \['image', 'animal'\]"):
        load_image_dataset(str(tmp_path / "strings"))
    bundle = load_image_dataset(str(tmp_path / "strings"), label_column="animal")
    assert bundle.label2id == {"cat": 0, "dog": 1, "owl": 2}
    assert [bundle.eval[i]["label"] for i in range(3)] == [0, 0, 2]
    pickle.loads(pickle.dumps(TransformedDataset(bundle.train, build_transforms(STATS, train=True))))


def test_label_outside_the_label_map_is_refused(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    images = [_image("RGB", (8, 8), i) for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    split = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"image": images[:4], "label": [0, 1, 0, 1]}, features=features
            ),
            "test": datasets.Dataset.from_dict({"image": images[4:], "label": [1, -1]}, features=features),
        }
    )
    split.save_to_disk(str(tmp_path / "unlabeled"))
    with pytest.raises(ValueError) as info:
        load_image_dataset(str(tmp_path / "unlabeled"))
    message = str(info.value)
    assert "[-1]" in message and "outside the label map 0..1" in message and "--label_column" in message


# ---- transforms -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "I;16", "1", "CMYK"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    image = _image(mode if mode not in ("I;16",) else "L", (10, 7), seed=1)
    if mode == "I;16":
        image = Image.fromarray(np.full((7, 10), 65535, dtype=np.uint16))
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == (10, 7)
    if mode == "I;16":
        assert np.asarray(converted).min() == 255  # 16-bit white stays white


def test_every_mode_decodes_as_transformers_load_image() -> None:
    """Alpha, palette (with transparency), LA, CMYK, 16-bit and EXIF orientation: one decoding, the one
    transformers' pipeline uses, in training (to_rgb), evaluation, predict (load_rgb)."""
    import io

    from transformers.image_utils import load_image

    from deltatune.vision.preprocess import load_rgb

    rgba = np.random.default_rng(0).integers(0, 255, (6, 9, 4)).astype(np.uint8)
    rgba[:, :3, 3] = 0  # transparent third, colour underneath
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    _image("RGB", (12, 5), seed=4).save(rotated, format="JPEG", exif=exif)
    images = [
        Image.fromarray(rgba, "RGBA"),
        palette,
        Image.fromarray(rgba[..., :2].copy(), "LA"),
        _image("RGB", (5, 5), seed=5).convert("CMYK"),
        Image.fromarray(np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000),
        Image.open(io.BytesIO(rotated.getvalue())),
    ]
    for image in images:
        expected = np.asarray(load_image(image.copy() if image.format is None else image))
        assert np.array_equal(np.asarray(to_rgb(image)), expected), image.mode
        assert np.array_equal(np.asarray(load_rgb(image)), expected), image.mode
    assert to_rgb(images[-1]).size == (5, 12)  # upright


def test_a_16_bit_image_is_said_to_be_clipped_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import deltatune.vision.transforms as transforms

    monkeypatch.setattr(transforms, "_warned_wide", [])
    wide = Image.fromarray(np.full((4, 4), 4000, dtype=np.uint16))
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        to_rgb(wide)
        to_rgb(wide)
    assert caplog.text.count("values above 255 clipped to white") == 1


def test_eval_transform_shape_and_normalisation() -> None:
    transform = build_transforms(
        {"image_mean": [0.2, 0.4, 0.6], "image_std": [0.5, 0.25, 0.1], "size": {"height": 16, "width": 24}},
        False,
    )
    out = transform(Image.new("RGB", (50, 30), (255, 0, 51)))
    assert out.shape == (3, 16, 24) and out.dtype == torch.float32
    expected = torch.tensor([(1 - 0.2) / 0.5, (0 - 0.4) / 0.25, (0.2 - 0.6) / 0.1]).view(3, 1, 1)
    torch.testing.assert_close(out, expected.expand(3, 16, 24), rtol=0, atol=1e-5)
    assert torch.equal(out, transform(Image.new("RGB", (50, 30), (255, 0, 51))))  # deterministic


def test_eval_resize_keeps_the_aspect_and_crops_the_centre() -> None:
    image = np.zeros((8, 32, 3), dtype=np.uint8)
    image[:, 12:20] = 255  # a white band in the middle quarter
    stats = {"image_mean": [0.0] * 3, "image_std": [1.0] * 3}
    for size in ({"shortest_edge": 8}, {"height": 8, "width": 8}):
        out = build_transforms({**stats, "size": size}, False)(Image.fromarray(image))
        assert out.shape == (3, 8, 8)
        assert out.min() > 0.99  # the centre crop sees only the band
    stretched = build_transforms({**stats, "size": {"height": 8, "width": 8}}, False, keep_aspect=False)
    out = stretched(Image.fromarray(image))
    assert out[:, :, 0].max() < 0.01 and out[:, :, 3:5].mean() > 0.8  # the whole width, squeezed
    assert resolve_size({"crop_size": {"height": 5, "width": 6}, "size": {"shortest_edge": 9}}) == (5, 6)
    with pytest.raises(ValueError, match="cannot find the image size"):
        build_transforms({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}, True)
    with pytest.raises(ValueError, match="train_crop_scale must be two numbers"):
        build_transforms({**STATS, "train_crop_scale": 0.5}, True)


def test_train_transform_is_random_and_reads_domain_hints() -> None:
    torch.manual_seed(0)
    transform = build_transforms(STATS, train=True)
    assert transform.crop_scale == (0.08, 1.0) and transform.horizontal_flip
    image = _image("RGB", (40, 30), seed=2)
    outs = [transform(image) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert not torch.equal(outs[0], outs[1])
    assert all(o.min() >= -1 - 1e-6 and o.max() <= 1 + 1e-6 for o in outs)
    hinted = build_transforms({**STATS, "train_crop_scale": [0.9, 1.0], "train_horizontal_flip": False}, True)
    assert hinted.crop_scale == (0.9, 1.0) and not hinted.horizontal_flip
    # with full-area crops of a square image and no flip, training equals evaluation
    exact = build_transforms(STATS, True, crop_scale=(1.0, 1.0), horizontal_flip=False)
    exact.crop_ratio = (1.0, 1.0)
    square = _image("RGB", (32, 32), seed=3)
    torch.testing.assert_close(exact(square), build_transforms(STATS, False)(square))


def test_transforms_from_an_image_processor() -> None:
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 24, "width": 24}, image_mean=[0.1] * 3, image_std=[0.3] * 3)
    transform = build_transforms(processor, train=False)
    assert transform.size == (24, 24) and transform.mean == pytest.approx([0.1] * 3)
    assert transform(_image("L", (30, 30), 0)).shape == (3, 24, 24)
    with pytest.raises(ValueError, match="image_std must be positive"):
        ImageTransform((8, 8), [0.5] * 3, [0.0] * 3, train=False)


# ---- picklability, collate, DataLoader ------------------------------------------------------------------------------


def test_everything_pickles_and_collates(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "pets", corrupt=False)
    bundle = load_image_dataset(str(root), validation_split=0.25)
    for train in (True, False):
        transform = build_transforms(STATS, train=train)
        dataset = TransformedDataset(bundle.train, transform)
        clone = pickle.loads(pickle.dumps(dataset))
        assert len(clone) == len(dataset)
        if not train:
            assert torch.equal(clone[0]["pixel_values"], dataset[0]["pixel_values"])
    assert pickle.loads(pickle.dumps(collate_fn)) is collate_fn
    batch = collate_fn([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [
        dataset[i]["labels"] for i in range(3)
    ]
    legacy = collate_fn([{"pixel_values": torch.zeros(3, 2, 2), "label": 4}])  # the guide's key
    assert legacy["labels"].tolist() == [4]
    with pytest.raises(ValueError, match="empty batch"):
        collate_fn([])


def test_dataloader_with_worker_processes(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "pets")
    bundle = load_image_dataset(str(root), validation_split=0.25)
    dataset = TransformedDataset(bundle.train, build_transforms(STATS, train=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert sum(len(b["labels"]) for b in batches) == len(dataset)
    assert all(b["pixel_values"].shape[1:] == (3, 32, 32) for b in batches)


# ---- offline default ------------------------------------------------------------------------------------------


def test_offline_default_dataset() -> None:
    bundle = load_image_dataset()
    assert (len(bundle.train), len(bundle.eval)) == (1000, 797)
    assert bundle.id2label == {i: str(i) for i in range(10)}
    assert np.bincount([bundle.train[i]["label"] for i in range(1000)]).tolist() == [100] * 10
    row = bundle.eval[5]
    assert row["image"].mode == "L" and row["image"].size == (32, 32)
    assert load_image_dataset("offline-default", max_train_samples=50).train[0]["label"] in range(10)


def test_offline_backbone_loads_and_takes_query_value_adapters() -> None:
    from transformers import AutoImageProcessor, ViTForImageClassification

    from deltatune import LoraConfig, get_peft_model

    directory = offline_default_model_dir()
    assert Path(directory) == OFFLINE_BACKBONE_DIR
    assert (OFFLINE_BACKBONE_DIR / "model.safetensors").stat().st_size < 5_000_000
    pretext = json.loads((OFFLINE_BACKBONE_DIR / "pretraining.json").read_text())
    assert not set("0123456789") & set("".join(pretext["classes"]))  # the backbone never saw a digit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ViTForImageClassification.from_pretrained(
            directory, num_labels=10, ignore_mismatched_sizes=True
        )
    processor = AutoImageProcessor.from_pretrained(directory)
    transform = build_transforms(processor, train=True)
    assert not transform.horizontal_flip and transform.crop_scale[0] >= 0.5
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"]))
    batch = collate_fn([TransformedDataset(load_image_dataset().eval, transform)[i] for i in range(2)])
    assert peft_model(pixel_values=batch["pixel_values"]).logits.shape == (2, 10)


def test_glyph_renderer_is_deterministic_and_optdigits_like() -> None:
    spec = importlib.util.spec_from_file_location(
        "pretrain_backbone", REPO / "scripts" / "pretrain_backbone.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    images, labels = module.render_dataset(2, seed=5)  # the default style: sharp 32x32 bitmaps
    again, _ = module.render_dataset(2, seed=5)
    assert images.shape == (2 * len(module.CLASSES), 32, 32) and images.dtype == np.uint8
    assert set(np.unique(images)) == {0, 255} and np.array_equal(images, again)
    assert np.bincount(labels).tolist() == [2] * len(module.CLASSES)
    blocks, _ = module.render_dataset(1, seed=5, style="optdigits")
    assert blocks.shape == (len(module.CLASSES), 8, 8) and blocks.max() <= 16
    assert not set("0123456789") & set(module.CHARACTERS)


def test_decompression_bomb_is_refused_on_every_data_path(tmp_path: Path) -> None:
    """A PNG of a few kB whose header promises 96 M pixels is refused before decoding by the training paths
    (standard, fast, gpu), the evaluation path and predict's decode, naming the file."""
    from deltatune.vision import FastImageTransform, ImageFolderDataset
    from deltatune.vision.gpu import EncodedImageTransform
    from deltatune.vision.preprocess import EvalTransform, evaluation_processor, load_rgb
    from deltatune.vision.standard import StandardImageTransform

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    bomb = tmp_path / "a" / "bomb.png"
    Image.new("1", (12_000, 8_000)).save(bomb)
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "fine.png")
    assert bomb.stat().st_size < 100_000
    pattern = r"bomb.png: 12000 x 8000 pixels is more than the .* allowed"
    folder = ImageFolderDataset.from_directory(tmp_path)
    with pytest.raises(OSError, match=pattern):
        folder[0]
    transforms = [
        FastImageTransform.from_processor(STATS, train=True),
        EncodedImageTransform.from_processor(STATS, train=True),
        StandardImageTransform.from_processor(STATS, train=True),
        EvalTransform(evaluation_processor(STATS)),
        load_rgb,
    ]
    for transform in transforms:
        with pytest.raises(ValueError, match=pattern):
            transform(str(bomb))
    training = TransformedDataset(ImageFolderDataset.from_directory(tmp_path), build_transforms(STATS, True))
    with pytest.warns(RuntimeWarning, match=r"skipped unreadable image .*bomb.png"):
        assert training[0]["labels"] == 1  # the next readable image in its place (training only)


def test_evaluation_processor_is_what_auto_image_processor_loads(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, ViTImageProcessor

    from deltatune.vision.preprocess import evaluation_processor

    processor = evaluation_processor(
        ViTImageProcessor(size={"height": 24, "width": 24}, train_crop_scale=[0.7, 1])
    )
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(processor) and evaluation_processor(loaded).to_dict() == processor.to_dict()
    assert processor.size == {"shortest_edge": 24} and processor.crop_size == {"height": 24, "width": 24}
    assert build_transforms(loaded, train=True).crop_scale == (0.7, 1.0)  # the domain hints survive


def test_an_evaluation_batch_of_unreadable_images_is_empty_not_an_error(tmp_path: Path) -> None:
    from deltatune.vision import image_datasets, load_image_dataset

    root = _make_folder(tmp_path / "pets", corrupt=False)
    bundle = load_image_dataset(str(root), validation_split=0.5)
    _, evaluation, collate = image_datasets(bundle, STATS, "fast")
    batch = collate([None, None])
    assert batch["pixel_values"].shape == (0, 3, 32, 32) and batch["labels"].shape == (0,)
    assert collate([evaluation[0], None])["pixel_values"].shape == (1, 3, 32, 32)


def test_eval_collate_carries_the_names_of_unreadable_rows_to_the_main_process() -> None:
    """A DataLoader worker's dataset copy names the images it skips in its own process: the collate puts the
    names in the batch (only then: a good batch is as before) and the trainer's batch transform hands them to
    the main process's dataset."""
    from deltatune.vision.folder import SKIPPED_KEY, Unreadable
    from deltatune.vision.preprocess import EvalCollate, SkippedNames
    from deltatune.vision.transforms import TransformedDataset, collate_fn

    row = {"pixel_values": torch.zeros(3, 2, 2), "labels": 1}
    collate = EvalCollate(collate_fn, (2, 2))
    assert set(collate([row, row])) == {"pixel_values", "labels"}
    batch = collate([row, Unreadable("a.png"), None, Unreadable("b.png")])
    assert batch[SKIPPED_KEY] == ["a.png", "b.png"] and batch["labels"].tolist() == [1]
    empty = collate([Unreadable("a.png")])
    assert empty["pixel_values"].shape == (0, 3, 2, 2) and empty[SKIPPED_KEY] == ["a.png"]
    dataset = TransformedDataset([], lambda image: image, skip_unreadable=True)
    moved = []
    take = SkippedNames(dataset, lambda b, device: moved.append(device) or b)
    for each in (batch, empty):
        assert set(take(each, "cpu")) == {"pixel_values", "labels"}  # the model gets no extra key
    assert dataset.skipped == ["a.png", "b.png"] and moved == ["cpu", "cpu"]
