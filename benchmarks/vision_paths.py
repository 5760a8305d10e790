"""deltatune's own image code against ``torchvision.transforms.v2`` / ``torchvision.io``, stage by stage, in
one process with the two sides interleaved round by round (so a busy machine slows both alike).

Each row times one stage of a data path on the same inputs, ours then torchvision's (alternating which goes
first), and reports the median images/s over the rounds and the ratio ours/torchvision (> 1: ours is faster):

- ``decode``: a JPEG file to RGB pixels -- PIL (what transformers' ``load_image`` and our paths use) vs
  ``torchvision.io.decode_image``;
- ``fast train``: the fast path's training transform (PIL draft decode at reduced size, crop, one uint8
  antialiased resize, flip) vs ``decode_image`` + ``v2.RandomResizedCrop`` + ``v2.RandomHorizontalFlip``;
- ``resize``: the fast path's uint8 resize vs ``v2.functional.resize`` on the same tensor;
- ``standard train``: :class:`~deltatune.vision.transforms.ImageTransform` (PIL crop-resize, float per
  example) vs ``v2.Compose`` of PILToTensor, RandomResizedCrop, flip, ToDtype and Normalize;
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
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    from deltatune.vision.fast import FastCollate, FastImageTransform, _pixels, _resize
    from deltatune.vision.transforms import build_transforms

    fast = FastImageTransform.from_processor(STATS, train=True)
    standard = build_transforms(STATS, train=True)
    tv_train = v2.Compose([v2.RandomResizedCrop(SIZE, antialias=True), v2.RandomHorizontalFlip()])
    tv_standard = v2.Compose(
        [
            v2.PILToTensor(),
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
        "standard train": (
            lambda: [standard(im) for im in pil],
            lambda: [tv_standard(im) for im in pil],
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
