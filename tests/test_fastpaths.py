"""The fast paths against the reference maths: values and gradients (methods/_fused.py, the merged-weight
forward of LoHa/LoKr, LoKr's batched reshape) and the fast image data path (vision/fast.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from deltatune import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from deltatune.methods._fused import (
    CPU_MASK_MIN_NUMEL,
    dropout_keep_mask,
    low_rank_add,
    low_rank_gemms,
    merged_weight_pays,
)
from deltatune.methods.lokr import lokr_delta_forward
from deltatune.vision.fast import FastCollate, FastImageTransform, ImagePathRows
from deltatune.vision.transforms import TransformedDataset, build_transforms, collate_fn

D64 = torch.float64


def leaf(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D64).requires_grad_(True)


def grads(y: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(y, inputs, g))


# ---- dropout mask ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "tolerance"),
    [
        ((400, 500), 0.005),  # 200k draws, CPU's integer mask: 4 sigma ≈ 0.0027
        ((100, 100), 0.015),  # 10k draws, under CPU_MASK_MIN_NUMEL: F.dropout; 4 sigma = 0.012
    ],
)
def test_keep_mask_rate_and_seed(shape: tuple[int, int], tolerance: float) -> None:
    torch.manual_seed(0)
    a = dropout_keep_mask(torch.Size(shape), 0.1, torch.device("cpu"))
    torch.manual_seed(0)
    b = dropout_keep_mask(torch.Size(shape), 0.1, torch.device("cpu"))
    assert a.dtype == torch.bool and torch.equal(a, b)
    assert abs(a.float().mean().item() - 0.9) < tolerance


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_cpu_mask_both_words_of_each_draw_and_odd_widths(p: float) -> None:
    """The CPU mask reads two 32-bit words from each 64-bit draw: entries at even and at odd positions (the
    low and the high word) are each kept with probability 1 − p, the two words of a draw are independent,
    and an odd last dimension is cut, not wrapped into the next row."""
    torch.manual_seed(1)
    keep = dropout_keep_mask(torch.Size((600, 401)), p, torch.device("cpu"))
    assert keep.shape == (600, 401) and keep.dtype == torch.bool
    sigma4 = 4 * (p * (1 - p) / (600 * 200)) ** 0.5
    even, odd = keep[:, 0:400:2].float(), keep[:, 1:400:2].float()
    assert abs(even.mean().item() - (1 - p)) < sigma4 and abs(odd.mean().item() - (1 - p)) < sigma4
    both = (even * odd).mean().item()  # independent words: P(both kept) = (1 − p)²
    assert abs(both - (1 - p) ** 2) < 2 * sigma4


def test_cpu_mask_extremes() -> None:
    """p just above 0 keeps (nearly) everything, p just below 1 drops (nearly) everything: the threshold
    never wraps around the 32-bit range."""
    shape = torch.Size((CPU_MASK_MIN_NUMEL, 2))
    assert dropout_keep_mask(shape, 1e-12, torch.device("cpu")).all()
    assert not dropout_keep_mask(shape, 1 - 1e-12, torch.device("cpu")).any()


# ---- low_rank_gemms / low_rank_add --------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("tokens", [5, CPU_MASK_MIN_NUMEL // 24 + 1])  # F.dropout; the CPU integer mask
def test_low_rank_gemms_match_reference(p: float, with_bias: bool, tokens: int) -> None:
    x, w = leaf(2, tokens, 12, seed=1), leaf(10, 12, seed=2)
    bias = leaf(10, seed=3) if with_bias else None
    a, b = leaf(3, 12, seed=4), leaf(10, 3, seed=5)
    inputs = [t for t in (x, w, bias, a, b) if t is not None]
    torch.manual_seed(7)
    y = low_rank_gemms(x, w, bias, a, b, 0.7, p, D64)
    torch.manual_seed(7)
    keep = dropout_keep_mask(x.shape, p, x.device) if p else torch.ones_like(x)
    ref = F.linear(x, w, bias) + ((x * keep / (1 - p)) @ a.t() @ b.t()) * 0.7
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    for got, want in zip(grads(y, inputs, g), grads(ref, inputs, g), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_low_rank_gemms_gradcheck(p: float) -> None:
    x, w, bias = leaf(6, 8, seed=1), leaf(5, 8, seed=2), leaf(5, seed=3)
    a, b = leaf(2, 8, seed=4), leaf(5, 2, seed=5)

    def fn(*t: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(3)  # the same mask on every call
        return low_rank_gemms(*t, 1.3, p, D64)

    assert torch.autograd.gradcheck(fn, (x, w, bias, a, b))


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("tokens", [3, CPU_MASK_MIN_NUMEL // 28 + 1])  # F.dropout; the CPU integer mask
def test_low_rank_add_matches_reference(p: float, tokens: int) -> None:
    res, x = leaf(4, tokens, 9, seed=1), leaf(4, tokens, 7, seed=2)
    a, b = leaf(2, 7, seed=3), leaf(9, 2, seed=4)
    torch.manual_seed(11)
    y = low_rank_add(res, x, a, b, 0.5, p)
    torch.manual_seed(11)
    keep = dropout_keep_mask(x.shape, p, x.device) if p else torch.ones_like(x)
    ref = res + ((x * keep / (1 - p)) @ a.t() @ b.t()) * 0.5
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    for got, want in zip(grads(y, [res, x, a, b], g), grads(ref, [res, x, a, b], g), strict=True):
        torch.testing.assert_close(got, want)


def test_low_rank_add_under_autocast_keeps_dtypes() -> None:
    x = torch.randn(6, 8, requires_grad=True)
    a = torch.randn(2, 8, requires_grad=True)
    b = torch.randn(4, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = F.linear(x, torch.randn(4, 8))
        y = low_rank_add(result, x, a, b, 0.5, dropout=0.1)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert a.grad is not None and a.grad.dtype == torch.float32 and b.grad is not None


# ---- layers: fused forward equals the generic path ----------------------------------------------------
def _generic(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    result = layer.base_layer(x)
    for name in layer.active_adapters:
        result = result + layer.adapter_output(x, name)
    return result


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=3, target_modules=["0"], init_lora_weights=False),
        AdaLoraConfig(init_r=3, target_r=2, total_step=5, target_modules=["0"], init_lora_weights=False),
        LoHaConfig(r=3, target_modules=["0"], init_weights=False),
        LoKrConfig(r=3, target_modules=["0"], init_weights=False),
    ],
    ids=["lora", "adalora", "loha", "lokr"],
)
def test_fused_forward_equals_generic_path(config: object) -> None:
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(24, 20)), config)  # type: ignore[arg-type]
    layer = model.base_model.model[0]
    model.train()  # no dropout configured: train mode exercises the gradient-saving paths
    x = torch.randn(5, 7, 24, requires_grad=True)
    y = model(x)
    ref = _generic(layer, x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]
    g = torch.randn_like(y)
    for got, want in zip(grads(y, params, g), grads(ref, params, g), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Inference over many tokens folds ΔW into the weight on the fly (= what merging computes).
    model.eval()
    with torch.no_grad():
        many = torch.randn(64, 7, 24)
        torch.testing.assert_close(model(many), _generic(layer, many), atol=1e-5, rtol=1e-5)
        model.merge_adapter()
        merged = model(many)
        model.unmerge_adapter()
        torch.testing.assert_close(model(many), merged, atol=1e-4, rtol=1e-5)


def test_merged_weight_choice() -> None:
    x32, w32 = torch.randn(100, 64), torch.randn(64, 64)
    assert merged_weight_pays(x32, w32, 100, None, 1e5, training=True)  # no factored path: merge
    assert not merged_weight_pays(x32.bfloat16(), w32.bfloat16(), 100, None, 1e5, training=True)
    # A factored term far cheaper than the weight-gradient GEMM wins in training...
    assert not merged_weight_pays(x32, w32, 100, 10.0, 64 * 64, training=True)
    # ...and in inference with one token, while many tokens amortise building W + ΔW.
    assert not merged_weight_pays(x32[:1], w32, 1, 500.0, 64 * 64, training=False)
    assert merged_weight_pays(x32, w32, 100, 500.0, 64 * 64, training=False)


def test_module_dropout_skips_in_the_merged_path() -> None:
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(16, 16)),
        LoHaConfig(r=8, target_modules=["0"], module_dropout=0.5, init_weights=False),
    )
    layer = model.base_model.model[0]
    x = torch.randn(64, 16)
    base, full = layer.base_layer(x), _generic(layer, x)
    outcomes = set()
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(40):
        model.zero_grad(set_to_none=True)
        y = model(x)
        skipped = torch.allclose(y, base)
        outcomes.add("skip" if skipped else "full" if torch.allclose(y, full, atol=1e-5) else "?")
        if y.requires_grad:
            y.sum().backward()
        # as in PEFT, a skipped step leaves the adapter without a gradient, so the optimiser skips it too
        # (under torch.distributed a zero-valued term reaches every tensor instead: tests/test_ddp.py)
        assert all((p.grad is None) == skipped for p in params)
    assert outcomes == {"skip", "full"}


def test_lokr_batched_reshape_matches_kron() -> None:
    w1, w2 = torch.randn(4, 6, dtype=D64), torch.randn(5, 7, dtype=D64)
    x = torch.randn(2, 3, 42, dtype=D64)
    dense = (torch.kron(w1, w2) * 0.5).t()
    torch.testing.assert_close(lokr_delta_forward(x, w1, 0.5, w2=w2), x @ dense)
    w2a, w2b = torch.randn(5, 2, dtype=D64), torch.randn(2, 7, dtype=D64)
    factored = (torch.kron(w1, w2a @ w2b) * 0.5).t()
    torch.testing.assert_close(lokr_delta_forward(x, w1, 0.5, w2a=w2a, w2b=w2b), x @ factored)


# ---- fast image path -------------------------------------------------------------------------------
STATS = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "size": {"height": 32, "width": 32}}


def _jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    if orientation is None:
        image.save(buffer, "JPEG", quality=95)
    else:
        exif = image.getexif()
        exif[0x0112] = orientation
        image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [None, 6])
def test_fast_eval_transform_without_draft_matches_reference(orientation: int | None) -> None:
    """Same pixels as ImageTransform up to resampling rounding (torch's uint8 resize vs PIL's: one level)."""
    data = _jpeg(60, 40, orientation)
    reference = build_transforms(STATS, False)
    fast = FastImageTransform.from_processor(STATS, False, draft=None)
    want = collate_fn([{"pixel_values": reference(Image.open(io.BytesIO(data))), "labels": 1}])
    got = fast.collate()([{"pixel_values": fast(data), "labels": 1}])
    one_level = 1.0 / 255 / min(STATS["image_std"])  # type: ignore[arg-type]
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], atol=one_level * 1.01, rtol=0)
    assert torch.equal(got["labels"], want["labels"])


@pytest.mark.parametrize("orientation", [None, 6])
def test_fast_train_transform_is_crop_then_resize(orientation: int | None) -> None:
    """The training crop is torchvision's RandomResizedCrop semantics: the same box as ImageTransform draws,
    cropped and then resized (so no pixels from outside the box), flipped with the same draw."""
    from PIL import ImageOps

    data = _jpeg(60, 40, orientation)
    fast = FastImageTransform.from_processor(STATS, True, draft=None)
    for seed in range(4):
        torch.manual_seed(seed)
        got = fast(data).numpy().astype(int)
        torch.manual_seed(seed)
        upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        box = fast.spec.random_crop_box(*upright.size)
        want = upright.crop(box).resize((32, 32), Image.Resampling.BILINEAR)
        if torch.rand(1).item() < 0.5:
            want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        difference = np.abs(got - np.asarray(want, dtype=int))
        assert difference.max() <= 2 and difference.mean() < 0.2, (seed, difference.max(), difference.mean())


def test_fast_transform_draft_decodes_smaller_and_stays_close() -> None:
    data = _jpeg(256, 256)
    fast = FastImageTransform.from_processor(STATS, False, draft="image")
    reference = build_transforms(STATS, False)
    out = fast(data)
    assert out.shape == (32, 32, 3) and out.dtype == torch.uint8
    got = fast.collate()([{"pixel_values": out, "labels": 0}])["pixel_values"][0]
    want = reference(Image.open(io.BytesIO(data)))
    # Noise images resample differently at 1/8 scale; the means per channel still agree.
    torch.testing.assert_close(got.mean(dim=(1, 2)), want.mean(dim=(1, 2)), atol=0.1, rtol=0)


def test_fast_dataset_rows_and_collate(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    files = []
    for i in range(3):
        path = root / f"{i}.jpg"
        path.write_bytes(_jpeg(48, 40))
        files.append(path)
    fast = FastImageTransform.from_processor(STATS, True)
    data = TransformedDataset(ImagePathRows(files, [0, 1, 2]), fast)
    batch = fast.collate()([data[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == [0, 1, 2]


def test_fast_collate_rejects_float_pixels() -> None:
    with pytest.raises(ValueError, match="uint8"):
        FastCollate([0.5] * 3, [0.5] * 3)([{"pixel_values": torch.zeros(3, 4, 4), "labels": 0}])
    with pytest.raises(ValueError, match="draft"):
        FastImageTransform(build_transforms(STATS, True), draft="half")


def _jpeg_folder(root: object, per_class: int = 3) -> object:
    from pathlib import Path

    base = Path(str(root))
    for c in ("a", "b"):
        (base / c).mkdir(parents=True)
        for i in range(per_class):
            (base / c / f"{i}.jpg").write_bytes(_jpeg(64, 48))
    return base


def test_undecoded_keeps_images_lazy_for_every_source(tmp_path: object) -> None:
    import datasets

    from deltatune.vision import HubSplit, ImageFolderDataset, SubsetDataset, undecoded

    root = _jpeg_folder(tmp_path)
    folder = ImageFolderDataset.from_directory(root)  # type: ignore[arg-type]
    rows = undecoded(folder)
    assert isinstance(rows, ImagePathRows) and rows[4] == {"image": folder.files[4], "label": 1}
    subset = undecoded(SubsetDataset(folder, [5, 0]))
    assert isinstance(subset.dataset, ImagePathRows) and subset[0]["image"] == folder.files[5]

    hub = datasets.Dataset.from_dict(
        {"img": folder.files, "y": folder.labels},
        features=datasets.Features({"img": datasets.Image(), "y": datasets.Value("int64")}),
    )
    split = HubSplit(hub, "img", "y")
    lazy = undecoded(split)
    assert lazy is not split and lazy.dataset.features["img"].decode is False
    image = lazy[2]["image"]
    assert image.format == "JPEG" and image.tile, "not decoded yet, so draft mode can still shrink it"
    assert undecoded(lazy) is lazy
    in_memory = [{"image": Image.new("RGB", (8, 8)), "label": 0}]
    assert undecoded(in_memory) is in_memory


@pytest.mark.parametrize("pipeline", ["fast", "standard", "gpu"])
def test_image_datasets_pipelines_agree(tmp_path: object, pipeline: str) -> None:
    from deltatune.vision import image_datasets, load_image_dataset

    bundle = load_image_dataset(str(_jpeg_folder(tmp_path, per_class=4)), validation_split=0.5)
    train, evaluation, collate = image_datasets(bundle, STATS, pipeline)
    batch = collate([evaluation[i] for i in range(len(evaluation))])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    train_batch = collate([train[0], train[1]])
    if "encoded_images" in train_batch:  # the gpu path: decoded by its device half (here on the CPU)
        train_batch = collate.device_transform(train_batch, "cpu")
    assert train_batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["labels"].tolist() == bundle.eval.labels
    # whatever the training pipeline, evaluation is exactly transformers' pipeline preprocessing: its decoding
    # (load_image) and the evaluation processor (no reduced-size JPEG decoding)
    from transformers.image_utils import load_image

    from deltatune.vision.preprocess import evaluation_processor

    processor = evaluation_processor(STATS)
    reference = [
        processor(images=load_image(f), return_tensors="pt")["pixel_values"][0] for f in bundle.eval.files
    ]
    assert torch.equal(batch["pixel_values"], torch.stack(reference))
    with pytest.raises(
        ValueError, match=r"data pipeline 'turbo' is not valid; choose one of 'fast', 'standard', 'gpu'"
    ):
        image_datasets(bundle, STATS, "turbo")


def test_edge_crop_after_draft_scaling_stays_inside_the_image() -> None:
    """A one-pixel box at the far edge, scaled by the draft decode, must not round past the last pixel."""
    data = _jpeg(512, 512)
    fast = FastImageTransform.from_processor(STATS, True, draft="image")
    fast.spec.random_crop_box = lambda width, height, generator=None: (width - 1, height - 1, width, height)  # type: ignore[method-assign]
    out = fast(data)
    assert out.shape == (32, 32, 3) and out.dtype == torch.uint8


# ---- standard image path -------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", [None, 3, 6, 8])
def test_standard_decode_is_pils_pixels(orientation: int | None) -> None:
    """torchvision's JPEG decoder (EXIF orientation applied) gives exactly the pixels PIL's full decode does."""
    from PIL import ImageOps

    from deltatune.vision.standard import decode_upright

    data = _jpeg(60, 40, orientation)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    want = torch.from_numpy(np.asarray(upright)).permute(2, 0, 1)
    assert torch.equal(decode_upright(data), want)
    assert torch.equal(decode_upright({"bytes": data, "path": None}), want)
    assert torch.equal(decode_upright(upright), want)  # a decoded image: PIL's conversion
    gray = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(gray, "PNG")
    pixels = decode_upright(gray.getvalue())  # not a YCbCr JPEG: PIL's to_rgb
    assert pixels.shape == (3, 8, 8) and torch.equal(pixels[0], pixels[2])


@pytest.mark.parametrize("orientation", [None, 6])
def test_standard_train_transform_is_crop_then_resize(orientation: int | None) -> None:
    """The standard path draws ImageTransform's box and flip, cuts the box out, resizes it and normalises
    per example: within two intensity levels of PIL's crop-then-resize."""
    from PIL import ImageOps

    from deltatune.vision.standard import StandardImageTransform

    data = _jpeg(60, 40, orientation)
    standard = StandardImageTransform.from_processor(STATS)
    mean = torch.tensor(STATS["image_mean"]).view(3, 1, 1)  # type: ignore[arg-type]
    std = torch.tensor(STATS["image_std"]).view(3, 1, 1)  # type: ignore[arg-type]
    for seed in range(4):
        torch.manual_seed(seed)
        out = standard(data)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
        got = ((out * std + mean) * 255).permute(1, 2, 0).numpy()
        torch.manual_seed(seed)
        upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        box = standard.spec.random_crop_box(*upright.size)
        want = upright.crop(box).resize((32, 32), Image.Resampling.BILINEAR)
        if torch.rand(1).item() < 0.5:
            want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        difference = np.abs(got - np.asarray(want, dtype=np.float32))
        assert difference.max() <= 2.01 and difference.mean() < 0.2, (seed, difference.max())
    with pytest.raises(ValueError, match="evaluation has one path"):
        StandardImageTransform.from_processor(STATS, train=False)
