"""Decoding and augmenting images on the training device (``--data_pipeline gpu``), for GPUs the CPU cannot feed.

The work is split where it is cheapest:

- **DataLoader workers (CPU)** only read each file's bytes and its JPEG header, and draw the augmentation
  exactly as the CPU paths do (:meth:`~deltatune.vision.transforms.ImageTransform.random_crop_box` and a
  flip with probability ½ for training; the resize-and-centre-crop region for evaluation). A row is the
  encoded bytes, the crop box in the upright image, the flip flag and the EXIF orientation: a few kB
  instead of a decoded image.
- **The device** decodes the whole batch at once (``torchvision.io.decode_jpeg(device="cuda")``: nvJPEG on a
  CUDA GPU), rotates by the EXIF orientation, crops each box, resizes it with the same bilinear antialiased
  filter as the CPU path, flips, and normalises the batch as ``(x/255 − mean)/std``.

Semantics match :mod:`deltatune.vision.fast`: same crop-box distribution and flip, same resampling
filter, same normalisation. Pixels differ slightly, as the CPU path decodes JPEGs at reduced size and rounds
to uint8 after resizing, this one does neither. Images that are not JPEG (or that nvJPEG refuses) are
decoded on the CPU in the training process and moved over. The same code runs with ``device="cpu"``
(how it is tested without a GPU).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .fast import _ORIENTATION_TAG, open_image
from .transforms import ImageTransform, build_transforms

__all__ = [
    "EncodedCollate",
    "EncodedImage",
    "EncodedImageTransform",
    "GpuImageBatch",
    "choose_pipeline",
    "encoded_rows",
    "gpu_decode_available",
    "peak_tflops",
]

_EOI = b"\xff\xd9"


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
    """One example for the device: encoded bytes plus the augmentation drawn for it.

    Attributes:
        data: The file's bytes as a 1-D uint8 tensor.
        box: (left, top, right, bottom) in pixels of the upright image.
        flip: Whether to flip horizontally.
        orientation: EXIF orientation (1 = upright).
        is_jpeg: Whether nvJPEG can take it (else it is decoded on the CPU).
    """

    data: torch.Tensor
    box: tuple[float, float, float, float]
    flip: bool
    orientation: int
    is_jpeg: bool


class EncodedImageTransform:
    """Image source → :class:`EncodedImage` (bytes, crop box, flip), drawing the augmentation of ``spec``.

    Args:
        spec: The transform whose size, crop ranges, flip and statistics to follow.
    """

    def __init__(self, spec: ImageTransform) -> None:
        self.spec = spec

    @classmethod
    def from_processor(
        cls, image_processor_or_stats: Any, train: bool, **kwargs: Any
    ) -> EncodedImageTransform:
        """Like :func:`~deltatune.vision.transforms.build_transforms` (same arguments)."""
        return cls(build_transforms(image_processor_or_stats, train, **kwargs))

    def collate(self) -> EncodedCollate:
        """The collate function (with its device-side half, :attr:`EncodedCollate.device_transform`)."""
        spec = self.spec
        return EncodedCollate(GpuImageBatch(spec.size, spec.mean, spec.std, normalize=spec.normalize))

    #: Draws its crop and flip from the ``generator`` it is called with (see ``TransformedDataset``).
    accepts_generator = True

    def __call__(self, source: Any, generator: torch.Generator | None = None) -> EncodedImage:
        image = open_image(source)  # header only
        data = _raw_bytes(source)
        width, height = image.size
        try:
            orientation = int(image.getexif().get(_ORIENTATION_TAG, 1))
        except Exception:
            orientation = 1
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        is_jpeg = image.format == "JPEG"
        if is_jpeg and not data.rstrip(b"\x00").endswith(_EOI):
            raise OSError("truncated JPEG (no end-of-image marker)")
        spec = self.spec
        if spec.train:
            box: tuple[float, float, float, float] = tuple(
                float(v) for v in spec.random_crop_box(width, height, generator=generator)
            )  # type: ignore[assignment]
            flip = bool(spec.horizontal_flip and torch.rand(1, generator=generator).item() < 0.5)
        else:
            box, flip = _centre_box(spec, width, height), False
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return EncodedImage(tensor, box, flip, orientation, is_jpeg)


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


def _centre_box(spec: ImageTransform, width: int, height: int) -> tuple[float, float, float, float]:
    """The region of the original image that evaluation's resize + centre crop keeps."""
    out_h, out_w = spec.size
    if spec.resize_to is None:
        return 0.0, 0.0, float(width), float(height)
    scale = spec.resize_to / min(width, height)
    target_w, target_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = round((target_w - out_w) / 2.0), round((target_h - out_h) / 2.0)
    sx, sy = width / target_w, height / target_h
    return left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy


class EncodedCollate:
    """Batches :class:`EncodedImage` rows for :class:`GpuImageBatch` (which runs on the device).

    Returns (when called on ``{"pixel_values": EncodedImage, "labels"}`` rows):
        ``{"encoded_images": [EncodedImage, ...], "labels": int64 (B,)}``.
    """

    def __init__(self, device_transform: GpuImageBatch) -> None:
        self.device_transform = device_transform

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(examples) == 0:
            raise ValueError("EncodedCollate got an empty batch")
        images = [e["pixel_values"] for e in examples]
        if not all(isinstance(i, EncodedImage) for i in images):
            raise ValueError("EncodedCollate expects EncodedImage rows from EncodedImageTransform")
        labels = [e["labels"] if "labels" in e else e["label"] for e in examples]
        return {"encoded_images": images, "labels": torch.tensor([int(v) for v in labels], dtype=torch.long)}


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
    """The device half: decode a batch of :class:`EncodedImage`, crop, resize, flip, normalise.

    Args:
        size: Output (height, width).
        mean, std: Per-channel statistics in [0, 1] units.
        normalize: When False, only scale to [0, 1].
    """

    def __init__(
        self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], normalize: bool = True
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.mean = [float(m) for m in mean] if normalize else [0.0] * 3
        self.std = [float(s) for s in std] if normalize else [1.0] * 3
        self.decode_failures = 0

    def _decode(self, images: Sequence[EncodedImage], device: torch.device) -> list[torch.Tensor | None]:
        """Decoded (3, H, W) uint8 images on ``device``; None for one no decoder can read."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        jpegs = [i for i, image in enumerate(images) if image.is_jpeg]
        out: list[torch.Tensor | None] = [None] * len(images)
        if jpegs:
            try:
                decoded = decode_jpeg([images[i].data for i in jpegs], mode=ImageReadMode.RGB, device=device)
                for i, tensor in zip(jpegs, decoded, strict=True):
                    out[i] = tensor
            except RuntimeError:  # one bad stream fails the batched call: decode those one by one
                for i in jpegs:
                    with contextlib.suppress(RuntimeError):
                        out[i] = decode_jpeg(images[i].data, mode=ImageReadMode.RGB, device=device)
        for i, tensor in enumerate(out):
            if tensor is None:  # not a JPEG, or one the device refused: decode on the CPU
                try:
                    out[i] = decode_image(images[i].data, mode=ImageReadMode.RGB).to(
                        device, non_blocking=True
                    )
                except RuntimeError:
                    self.decode_failures += 1
        return out

    def __call__(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
        """Replaces ``batch["encoded_images"]`` by ``batch["pixel_values"]``: float32 (B, 3, H, W) on ``device``.

        Crops and resizes run as one ``roi_align`` per distinct image size in the batch (adaptive sampling:
        ⌈box / output⌉ bilinear samples averaged per output pixel, i.e. an antialiasing box filter when
        shrinking and plain bilinear when enlarging), not one resize per image. An image no decoder can
        read is dropped from the batch with its label, and counted in a warning.
        """
        from torchvision.ops import roi_align

        images: list[EncodedImage] = batch.pop("encoded_images")
        device = torch.device(device)
        decoded = self._decode(images, device)
        keep = [i for i, t in enumerate(decoded) if t is not None]
        if len(keep) < len(images):
            warnings.warn(
                f"dropped {len(images) - len(keep)} image(s) of the batch that could not be decoded "
                f"({self.decode_failures} so far)",
                RuntimeWarning,
                stacklevel=2,
            )
            if "labels" in batch:
                batch["labels"] = batch["labels"][keep]
        if not keep:
            raise RuntimeError("no image of the batch could be decoded")
        upright = [_orient(decoded[i], images[i].orientation) for i in keep]  # type: ignore[arg-type]
        groups: dict[tuple[int, int], list[int]] = {}
        for j, pixels in enumerate(upright):
            groups.setdefault((pixels.shape[1], pixels.shape[2]), []).append(j)
        out = torch.empty(len(keep), 3, *self.size, device=device)
        for members in groups.values():
            stack = torch.stack([upright[j] for j in members]).float()
            boxes = torch.tensor(
                [[k, *images[keep[j]].box] for k, j in enumerate(members)], dtype=torch.float32
            ).to(device, non_blocking=True)
            index = torch.tensor(members, device=device)
            out.index_copy_(0, index, roi_align(stack, boxes, self.size, 1.0, 0, aligned=True))
        flips = [j for j, i in enumerate(keep) if images[i].flip]
        if flips:
            index = torch.tensor(flips, device=device)
            out.index_copy_(0, index, out.index_select(0, index).flip(-1))
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        batch["pixel_values"] = out.mul_(1.0 / 255.0).sub_(mean).div_(std)
        return batch
