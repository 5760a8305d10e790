"""Decoding and augmenting images on the training device (``--data_pipeline gpu``), for GPUs the CPU cannot feed.

The work is split where it is cheapest:

- **DataLoader workers (CPU)** only read each file's bytes and its JPEG header, and draw the augmentation
  exactly as the CPU paths do (:meth:`~deltatune.vision.transforms.ImageTransform.random_crop_box` and a
  flip with probability ½). Training only: evaluation has one path for every pipeline (:mod:`.preprocess`). A row is the
  encoded bytes, the crop box in the upright image, the flip flag and the EXIF orientation: a few kB
  instead of a decoded image.
- **The device** decodes the whole batch at once (``torchvision.io.decode_jpeg(device="cuda")``: nvJPEG on a
  CUDA GPU), rotates by the EXIF orientation, crops each box and resizes it (``roi_align``: a bilinear,
  box-antialiased resampling, one call per image size), flips, and normalises as ``(x/255 − mean)/std``.

Semantics match :mod:`deltatune.vision.fast`: same crop-box distribution and flip, the same kind of
antialiased bilinear resampling (a box rather than a triangle filter), same normalisation. Pixels differ
slightly, as the CPU path decodes JPEGs at reduced size and rounds to uint8 after resizing. Only
YCbCr JPEGs go to the device decoder: anything else (PNG, alpha, 16-bit, CMYK or grayscale JPEG, GIF, BMP,
...) is decoded in the worker exactly as the CPU path decodes it, and its pixels are sent instead. A JPEG the
device refuses is decoded on the CPU; one nothing can read is dropped with its label and counted. The same
code runs with ``device="cpu"`` (how it is tested without a GPU).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .fast import _ORIENTATION_TAG, decode, open_image
from .transforms import ImageTransform, build_transforms

__all__ = [
    "EncodedBatch",
    "EncodedCollate",
    "EncodedImage",
    "EncodedImageTransform",
    "GpuImageBatch",
    "choose_pipeline",
    "encoded_rows",
    "gpu_decode_available",
    "peak_tflops",
]


def gpu_decode_available(device: torch.device | str) -> bool:
    """Whether ``torchvision.io.decode_jpeg`` can decode on ``device`` (a CUDA GPU with nvJPEG, or the CPU)."""
    device = torch.device(device)
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.is_available()


def encoded_rows(split: Any) -> Any:
    """``split`` with undecoded images (paths or bytes), as the gpu path needs them.

    Raises:
        ValueError: when the images are already decoded in memory (nothing to decode on the device).
    """
    from .fast import undecoded

    rows = undecoded(split)
    if len(rows) and not _is_encoded(rows[0].get("image")):
        raise ValueError(
            "--data_pipeline gpu needs images stored as files or encoded bytes (JPEG, PNG); this dataset holds "
            "decoded images, so use --data_pipeline fast"
        )
    return rows


def _is_encoded(source: Any) -> bool:
    if isinstance(source, (bytes, bytearray, str)) or hasattr(source, "__fspath__"):
        return True
    return isinstance(source, Mapping) and (source.get("bytes") is not None or source.get("path") is not None)


#: Dense bf16 tensor throughput (TFLOP/s) by CUDA compute capability, to estimate how fast a GPU trains.
_PEAK_BF16_TFLOPS = {(7, 0): 125, (7, 5): 65, (8, 0): 312, (8, 6): 71, (8, 7): 27, (8, 9): 181, (9, 0): 989}


def peak_tflops(device: torch.device | str) -> float | None:
    """The dense bf16 TFLOP/s of a CUDA GPU's generation (an estimate from its compute capability)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) in _PEAK_BF16_TFLOPS:
        return float(_PEAK_BF16_TFLOPS[(major, minor)])
    if major == 10:  # data-centre Blackwell
        return 2250.0
    return 210.0 if major >= 12 else 100.0  # consumer Blackwell and anything unknown: modest


def choose_pipeline(
    requested: str,
    device: torch.device | str,
    split: Any,
    cpu_images_per_second: float | None,
    workers: int,
    forward_gflop: float | None,
    utilisation: float = 0.35,
) -> tuple[str, str]:
    """Resolves ``--data_pipeline`` (``auto`` → ``gpu`` or ``fast``); returns (pipeline, one-line reason).

    ``auto`` picks ``gpu`` when training on a CUDA GPU that can decode JPEGs, the data are encoded images, and
    the CPU's estimated rate (``cpu_images_per_second`` per worker × workers) is below the GPU's estimated
    training rate (``utilisation`` × its peak bf16 FLOP/s over 3 × the forward FLOPs per image).

    Raises:
        ValueError: for ``gpu`` when the device cannot decode or the data are decoded images.
    """
    device = torch.device(device)
    if requested == "gpu":
        if not gpu_decode_available(device):
            raise ValueError(
                f"--data_pipeline gpu needs torchvision's JPEG decoder on {device}; it is not available"
            )
        encoded_rows(split)
        return "gpu", "gpu (requested)"
    if requested != "auto":
        return requested, f"{requested} (requested)"
    if device.type != "cuda":
        return "fast", "fast (automatic: not training on a CUDA GPU)"
    if not gpu_decode_available(device):
        return "fast", "fast (automatic: torchvision cannot decode JPEGs on this GPU)"
    try:
        encoded_rows(split)
    except ValueError:
        return "fast", "fast (automatic: the images are already decoded in memory)"
    peak = peak_tflops(device)
    if peak is None or not forward_gflop or not cpu_images_per_second:
        return "fast", "fast (automatic: the GPU's or the CPU's rate could not be estimated)"
    gpu_rate = utilisation * peak * 1e3 / (3.0 * forward_gflop)
    cpu_rate = cpu_images_per_second * max(1, workers)
    choice = "gpu" if cpu_rate < gpu_rate else "fast"
    return choice, (
        f"{choice} (automatic: {max(1, workers)} CPU worker(s) decode about {cpu_rate:.0f} images/s, the GPU "
        f"trains about {gpu_rate:.0f}/s at {forward_gflop:.1f} GFLOP per image; --data_pipeline fast|gpu overrides)"
    )


@dataclass
class EncodedImage:
    """One example for the device: the image (encoded bytes for nvJPEG, or pixels decoded in the worker)
    plus the augmentation drawn for it.

    Attributes:
        data: The file's bytes when the device decodes it (a baseline/progressive YCbCr JPEG), else None.
        pixels: Upright RGB pixels (3, H, W) uint8 decoded in the worker for anything else (PNG, alpha,
            16-bit, CMYK or grayscale JPEG, ...: converted as the CPU path does, alpha dropped), else None.
        box: (left, top, right, bottom) in pixels of the upright image.
        flip: Whether to flip horizontally.
        orientation: EXIF orientation of ``data`` (1 = upright; ``pixels`` are upright already).
    """

    data: bytes | None
    pixels: torch.Tensor | None
    box: tuple[float, float, float, float]
    flip: bool
    orientation: int


class EncodedImageTransform:
    """Image source → :class:`EncodedImage` (bytes or pixels, crop box, flip), drawing the augmentation of
    ``spec``.

    Args:
        spec: The transform whose size, crop ranges, flip and statistics to follow.
    """

    def __init__(self, spec: ImageTransform) -> None:
        if not spec.train:
            raise ValueError(
                "the gpu data path trains; evaluation has one path (deltatune.vision.preprocess)"
            )
        self.spec = spec

    @classmethod
    def from_processor(
        cls, image_processor_or_stats: Any, train: bool = True, **kwargs: Any
    ) -> EncodedImageTransform:
        """Like :func:`~deltatune.vision.transforms.build_transforms` (training only)."""
        return cls(build_transforms(image_processor_or_stats, train, **kwargs))

    def collate(self) -> EncodedCollate:
        """The collate function (with its device-side half, :attr:`EncodedCollate.device_transform`)."""
        spec = self.spec
        return EncodedCollate(GpuImageBatch(spec.size, spec.mean, spec.std, normalize=spec.normalize))

    #: Draws its crop and flip from the ``generator`` it is called with (see ``TransformedDataset``).
    accepts_generator = True

    def __call__(self, source: Any, generator: torch.Generator | None = None) -> EncodedImage:
        image = open_image(source)  # header only
        try:
            return self._encode(source, image, generator)
        finally:
            image.close()

    def _encode(self, source: Any, image: Any, generator: torch.Generator | None) -> EncodedImage:
        width, height = image.size
        try:
            orientation = int(image.getexif().get(_ORIENTATION_TAG, 1))
        except Exception:
            orientation = 1
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        spec = self.spec
        box: tuple[float, float, float, float] = tuple(
            float(v) for v in spec.random_crop_box(width, height, generator=generator)
        )  # type: ignore[assignment]
        flip = bool(spec.horizontal_flip and torch.rand(1, generator=generator).item() < 0.5)
        if image.format == "JPEG" and image.mode == "RGB":  # YCbCr: what nvJPEG decodes to RGB
            return EncodedImage(_raw_bytes(source), None, box, flip, orientation)
        upright = decode(image, None, orientation)  # the CPU path's: EXIF, convert("RGB") (alpha dropped)
        pixels = torch.from_numpy(np.asarray(upright, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        return EncodedImage(None, pixels, box, flip, 1)


def _raw_bytes(source: Any) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, Mapping):
        if source.get("bytes") is not None:
            return bytes(source["bytes"])
        source = source.get("path")
    if source is None or (not hasattr(source, "__fspath__") and not isinstance(source, str)):
        raise TypeError(
            f"the gpu data path needs encoded images (paths or bytes), got {type(source).__name__}"
        )
    with open(source, "rb") as fh:
        return fh.read()


@dataclass
class EncodedBatch:
    """A collated batch for :class:`GpuImageBatch`: every encoded image's bytes in one uint8 tensor (one
    storage to pass between processes, not one per image), their offsets and lengths, the worker-decoded
    pixels, and the augmentation as tensors.

    Attributes:
        blob: All encoded bytes, concatenated (1-D uint8).
        spans: (offset, length) into ``blob`` per example, (0, 0) for a worker-decoded one.
        pixels: Worker-decoded (3, H, W) uint8 per example, None for an encoded one.
        boxes: (B, 4) float32 crop boxes.
        flips: (B,) bool.
        orientations: EXIF orientation per example.
    """

    blob: torch.Tensor
    spans: list[tuple[int, int]]
    pixels: list[torch.Tensor | None]
    boxes: torch.Tensor
    flips: torch.Tensor
    orientations: list[int]

    def __len__(self) -> int:
        return len(self.spans)


class EncodedCollate:
    """Batches :class:`EncodedImage` rows into an :class:`EncodedBatch` for :class:`GpuImageBatch`.

    Returns (when called on ``{"pixel_values": EncodedImage, "labels"}`` rows):
        ``{"encoded_images": EncodedBatch, "labels": int64 (B,)}``.
    """

    def __init__(self, device_transform: GpuImageBatch) -> None:
        self.device_transform = device_transform

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(examples) == 0:
            raise ValueError("EncodedCollate got an empty batch")
        images = [e["pixel_values"] for e in examples]
        if not all(isinstance(i, EncodedImage) for i in images):
            raise ValueError("EncodedCollate expects EncodedImage rows from EncodedImageTransform")
        spans: list[tuple[int, int]] = []
        offset = 0
        for image in images:
            length = len(image.data) if image.data is not None else 0
            spans.append((offset, length))
            offset += length
        blob = torch.frombuffer(
            bytearray(b"".join(i.data or b"" for i in images)) or bytearray(1), dtype=torch.uint8
        )
        batch = EncodedBatch(
            blob=blob,
            spans=spans,
            pixels=[i.pixels for i in images],
            boxes=torch.tensor([i.box for i in images], dtype=torch.float32),
            flips=torch.tensor([i.flip for i in images], dtype=torch.bool),
            orientations=[i.orientation for i in images],
        )
        labels = [e["labels"] if "labels" in e else e["label"] for e in examples]
        return {"encoded_images": batch, "labels": torch.tensor([int(v) for v in labels], dtype=torch.long)}


def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) turned upright by its EXIF ``orientation``, as PIL's ``ImageOps.exif_transpose`` does."""
    if orientation in (2, 4):
        return image.flip(2 if orientation == 2 else 1)
    if orientation == 3:
        return image.flip(1, 2)
    if orientation == 5:
        return image.transpose(1, 2)
    if orientation == 6:
        return image.transpose(1, 2).flip(2)
    if orientation == 7:
        return image.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return image.transpose(1, 2).flip(1)
    return image


class GpuImageBatch:
    """The device half: decode an :class:`EncodedBatch`, crop, resize, flip, normalise.

    Args:
        size: Output (height, width).
        mean, std: Per-channel statistics in [0, 1] units.
        normalize: When False, only scale to [0, 1].
        chunk_bytes: Largest float32 stack handed to one ``roi_align`` (large photos go in several).
    """

    def __init__(
        self,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        normalize: bool = True,
        chunk_bytes: int = 512 * 2**20,
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.mean = [float(m) for m in mean] if normalize else [0.0] * 3
        self.std = [float(s) for s in std] if normalize else [1.0] * 3
        self.chunk_bytes = chunk_bytes
        self.decode_failures = 0
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:  # device tensors stay out of pickles (DataLoader workers)
        return {**self.__dict__, "_affine": {}}

    def _decode(self, batch: EncodedBatch, device: torch.device) -> list[torch.Tensor | None]:
        """Upright (3, H, W) uint8 images on ``device``; None for one no decoder can read."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        with (
            warnings.catch_warnings()
        ):  # torchvision 0.29+ warns on every decode that torchcodec supersedes it
            warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")
            return self._decode_all(batch, device, decode_jpeg, decode_image, ImageReadMode.RGB)

    def _decode_all(
        self, batch: EncodedBatch, device: torch.device, decode_jpeg: Any, decode_image: Any, rgb: Any
    ) -> list[torch.Tensor | None]:
        encoded = [i for i, (_, n) in enumerate(batch.spans) if n > 0]
        streams = {i: batch.blob[o : o + n] for i, (o, n) in enumerate(batch.spans) if n > 0}
        out: list[torch.Tensor | None] = [
            None if p is None else p.to(device, non_blocking=True) for p in batch.pixels
        ]
        if encoded:
            try:
                decoded = decode_jpeg([streams[i] for i in encoded], mode=rgb, device=device)
                for i, tensor in zip(encoded, decoded, strict=True):
                    out[i] = tensor
            except RuntimeError:  # one bad stream fails the batched call: decode those one by one
                for i in encoded:
                    with contextlib.suppress(RuntimeError):
                        out[i] = decode_jpeg(streams[i], mode=rgb, device=device)
            for i in encoded:
                if out[i] is None:  # refused on the device: the CPU decoder, else dropped
                    try:
                        out[i] = decode_image(streams[i], mode=rgb).to(device, non_blocking=True)
                    except RuntimeError:
                        self.decode_failures += 1
                        continue
                out[i] = _orient(out[i], batch.orientations[i])  # type: ignore[arg-type]
        return out

    def _statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1/(255·std), −mean/std) as (1, 3, 1, 1) tensors on ``device``, made once per device."""
        if device not in self._affine:
            std, mean = torch.tensor(self.std), torch.tensor(self.mean)
            scale, shift = (1.0 / (255.0 * std)).view(1, 3, 1, 1), (-mean / std).view(1, 3, 1, 1)
            self._affine[device] = (scale.to(device), shift.to(device))
        return self._affine[device]

    def __call__(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
        """Replaces ``batch["encoded_images"]`` by ``batch["pixel_values"]``: float32 (B, 3, H, W) on ``device``.

        Crops and resizes run as one ``roi_align`` per distinct image size in the batch (in chunks for large
        photos; adaptive sampling: ⌈box / output⌉ bilinear samples averaged per output pixel, i.e. an
        antialiasing box filter when shrinking and plain bilinear when enlarging), not one resize per image.
        An image no decoder can read is dropped from the batch with its label, and counted in a warning.
        """
        from torchvision.ops import roi_align

        if "encoded_images" not in batch:  # an evaluation batch: pixel values already
            return batch
        encoded: EncodedBatch = batch.pop("encoded_images")
        device = torch.device(device)
        decoded = self._decode(encoded, device)
        keep = [i for i, t in enumerate(decoded) if t is not None]
        if len(keep) < len(encoded):
            warnings.warn(
                f"dropped {len(encoded) - len(keep)} image(s) of the batch that could not be decoded "
                f"({self.decode_failures} so far)",
                RuntimeWarning,
                stacklevel=2,
            )
            if "labels" in batch:
                batch["labels"] = batch["labels"][keep]
        if not keep:
            raise RuntimeError("no image of the batch could be decoded")
        groups: dict[tuple[int, int], list[int]] = {}
        for i in keep:
            pixels = decoded[i]
            assert pixels is not None
            groups.setdefault((pixels.shape[1], pixels.shape[2]), []).append(i)
        boxes = encoded.boxes.to(device, non_blocking=True)
        resized: dict[int, torch.Tensor] = {}
        for (height, width), members in groups.items():
            per_chunk = max(1, self.chunk_bytes // (3 * height * width * 4))
            for start in range(0, len(members), per_chunk):
                chunk = members[start : start + per_chunk]
                stack = torch.stack([decoded[i] for i in chunk]).float()  # type: ignore[misc]
                rois = torch.cat(
                    [torch.arange(len(chunk), device=device, dtype=torch.float32).unsqueeze(1), boxes[chunk]],
                    1,
                )
                for i, image in zip(
                    chunk, roi_align(stack, rois, self.size, 1.0, 0, aligned=True), strict=True
                ):
                    resized[i] = image
        out = torch.stack([resized[i] for i in keep])
        flips = encoded.flips[keep].to(device, non_blocking=True).view(-1, 1, 1, 1)
        out = torch.where(flips, out.flip(-1), out)
        scale, shift = self._statistics(device)
        batch["pixel_values"] = out.mul_(scale).add_(shift)
        return batch
