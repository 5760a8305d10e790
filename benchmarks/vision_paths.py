"""deltatune's own image code against ``torchvision.transforms.v2`` / ``torchvision.io``, stage by stage, in
one process with the two sides interleaved round by round (so a busy machine slows both alike).

Each row times one stage of a data path on the same inputs, ours then torchvision's (alternating which goes
first), and reports the median images/s over the rounds and the ratio ours/torchvision (> 1: ours is faster):

- ``decode``: a JPEG file to RGB pixels -- PIL (what transformers' ``load_image`` and our paths use) vs
  ``torchvision.io.decode_image``;
- ``fast train``: the fast path's training transform (PIL draft decode at reduced size, crop, one uint8
  antialiased resize, flip) vs ``decode_image`` + ``v2.RandomResizedCrop`` + ``v2.RandomHorizontalFlip``;
- ``resize``: the fast path's uint8 resize vs ``v2.functional.resize`` on the same tensor;
- ``crop + resize``: the standard path's crop and resize of a decoded (3, H, W) image (slice, then the fast
  path's uint8 resize) vs ``v2.functional.resized_crop``, on the same boxes;
- ``standard train``: a file to a normalised float tensor:
  :class:`~deltatune.vision.standard.StandardImageTransform` vs ``read_file`` + ``decode_jpeg`` +
  ``v2.Compose`` of RandomResizedCrop, flip, ToDtype and Normalize;
- ``normalise one``: the standard path's per-example ``(x/255 - mean)/std`` vs ``v2.ToDtype(scale=True)`` +
  ``v2.Normalize``, both on the tensor the standard path has there (the uint8 resize's channels-last
  output, seen as (3, H, W));
- ``normalise``: :class:`~deltatune.vision.fast.FastCollate` (one pass per batch) vs ``v2.Normalize`` per
  example then a stack.

Run from the repository root::

    python -m benchmarks.vision_paths                  # 48 JPEGs of 512 px, 7 rounds
    python -m benchmarks.vision_paths --images 96 --size 640 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import numpy as np
import torch
from PIL import Image

from .e2e import MEAN, SIZE, STD, synthetic_image

STATS = {"image_mean": MEAN, "image_std": STD, "size": {"height": SIZE, "width": SIZE}}


def stages(files: list[str]) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """(ours, torchvision's) per stage, each a callable that processes every file once."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
    from torchvision.transforms import v2

    from deltatune.vision.fast import FastCollate, FastImageTransform, _pixels, _resize
    from deltatune.vision.standard import StandardImageTransform

    fast = FastImageTransform.from_processor(STATS, train=True)
    standard = StandardImageTransform.from_processor(STATS, train=True)
    tv_train = v2.Compose([v2.RandomResizedCrop(SIZE, antialias=True), v2.RandomHorizontalFlip()])
    tv_standard = v2.Compose(
        [
            v2.RandomResizedCrop(SIZE, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    normalise = v2.Normalize(MEAN, STD)
    collate = FastCollate(MEAN, STD)
    pil = [Image.open(f).convert("RGB") for f in files]
    hwc = [_pixels(im) for im in pil]
    chw = [t.permute(2, 0, 1).contiguous() for t in hwc]
    crops = [fast(f) for f in files]
    rows = [{"pixel_values": c, "labels": 0} for c in crops]
    data = [torch.from_numpy(np.fromfile(f, dtype=np.uint8)) for f in files]
    generator = torch.Generator().manual_seed(0)
    boxes = [standard.spec.random_crop_box(t.shape[2], t.shape[1], generator) for t in chw]
    # what the standard path normalises: the uint8 resize of a crop of the decoded (3, H, W) image, (H, W, 3)
    # channels-last (a resize of a whole (H, W, 3) image comes out channels-first, which suits v2 better)
    hwc_out = [
        _resize(t[:, y0:y1, x0:x1].permute(1, 2, 0), SIZE, SIZE)
        for t, (x0, y0, x1, y1) in zip(chw, boxes, strict=True)
    ]

    def tv_decode() -> None:
        for d in data:
            decode_image(d, mode=ImageReadMode.RGB)

    return {
        "decode": (
            lambda: [np.asarray(Image.open(f).convert("RGB")) for f in files],
            tv_decode,
        ),
        "fast train": (
            lambda: [fast(f) for f in files],
            lambda: [tv_train(decode_image(d, mode=ImageReadMode.RGB)) for d in data],
        ),
        "resize": (
            lambda: [_resize(t, SIZE, SIZE) for t in hwc],
            lambda: [v2.functional.resize(t, [SIZE, SIZE], antialias=True) for t in chw],
        ),
        "crop + resize": (
            lambda: [
                _resize(t[:, y0:y1, x0:x1].permute(1, 2, 0), SIZE, SIZE)
                for t, (x0, y0, x1, y1) in zip(chw, boxes, strict=True)
            ],
            lambda: [
                v2.functional.resized_crop(t, y0, x0, y1 - y0, x1 - x0, [SIZE, SIZE], antialias=True)
                for t, (x0, y0, x1, y1) in zip(chw, boxes, strict=True)
            ],
        ),
        "standard train": (
            lambda: [standard(f) for f in files],
            lambda: [tv_standard(decode_jpeg(read_file(f), mode=ImageReadMode.RGB)) for f in files],
        ),
        "normalise one": (
            lambda: [standard.normalise(t) for t in hwc_out],
            lambda: [
                v2.functional.normalize(
                    v2.functional.to_dtype(t.permute(2, 0, 1), torch.float32, scale=True), MEAN, STD
                )
                for t in hwc_out
            ],
        ),
        "normalise": (
            lambda: collate(rows),
            lambda: torch.stack(
                [normalise(v2.functional.to_dtype(c.permute(2, 0, 1), scale=True)) for c in crops]
            ),
        ),
    }


def measure(files: list[str], rounds: int) -> dict[str, dict[str, float]]:
    """Median images/s of both sides of every stage, interleaved."""
    torch.manual_seed(0)
    table = stages(files)
    rates: dict[str, dict[str, list[float]]] = {name: {"ours": [], "torchvision": []} for name in table}
    for pair in table.values():  # warm-up
        for run in pair:
            run()
    for rnd in range(rounds):
        for name, (ours, theirs) in table.items():
            order = [("ours", ours), ("torchvision", theirs)]
            for side, run in order if rnd % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                run()
                rates[name][side].append(len(files) / (time.perf_counter() - start))
    return {
        name: {side: statistics.median(values) for side, values in sides.items()}
        for name, sides in rates.items()
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.vision_paths", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--images", type=int, default=48, help="JPEGs to generate")
    p.add_argument("--size", type=int, default=512, help="their side in pixels")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        files = []
        for i in range(args.images):
            path = f"{root}/{i}.jpg"
            synthetic_image(rng, i % 5, args.size, 5).save(path, quality=90)
            files.append(path)
        medians = measure(files, args.rounds)
    print(
        f"\nimages/s per stage, {args.images} JPEGs of {args.size} px → {SIZE} px, {args.threads} torch thread(s), "
        f"median of {args.rounds} interleaved rounds"
    )
    print("| stage | deltatune | torchvision | ours / torchvision |")
    print("|---|---:|---:|---:|")
    for name, sides in medians.items():
        ours, theirs = sides["ours"], sides["torchvision"]
        print(f"| {name} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}x |")
    return medians


if __name__ == "__main__":
    main()
