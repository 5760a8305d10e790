"""``deltatune evaluate``'s memory against the number of images: peak resident memory (RSS) of one process
per image count, all else equal, so a growth with the count shows at once.

Generates small PNGs of many sizes (16-96 px, 3 classes, which is what fragments a heap) and a tiny ViT with
a LoRA adapter, then runs :func:`deltatune.tasks.inference.evaluate_adapter` on the first N images in a fresh
process per N and prints the RSS after loading the model and at the peak::

    python -m benchmarks.evaluate_memory                    # 2,000 and 8,000 images
    python -m benchmarks.evaluate_memory --images 1000 4000 16000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("a", "b", "c")

_CHILD = """
import json, resource, sys, torch
from deltatune.tasks.inference import evaluate_adapter, load_trained
from deltatune.vision import ImageFolderDataset

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
adapter, data, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
trained = load_trained(adapter)
rows = ImageFolderDataset.from_directory(__import__("pathlib").Path(data))
rows = rows.subset(range(n))
loaded = rss_mb()
report = evaluate_adapter(trained, rows, batch_size=64, progress=False)
report = getattr(report, "report", report)  # older releases returned the report itself
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"images": report.num_examples, "after_load_mb": loaded, "peak_mb": peak, "end_mb": rss_mb()}))
"""


def make_images(root: Path, count: int, seed: int = 0) -> None:
    """``count`` PNGs of random sizes 16-96 px spread over :data:`CLASSES`, under ``root/<class>/``."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        width, height = (int(v) for v in rng.integers(16, 97, 2))
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / CLASSES[i % 3] / f"{i:06d}.png", compress_level=1)


def make_adapter(root: Path) -> Path:
    """A tiny ViT (32 px) saved with its processor, and a LoRA adapter on it with labels."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from deltatune import LoraConfig, get_peft_model
    from deltatune.train.checkpoint import save_label_maps

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3, id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)},
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(root / "model")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "model")
    model = get_peft_model(
        ViTForImageClassification.from_pretrained(root / "model"),
        LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    model.peft_config["default"].base_model_name_or_path = str(root / "model")
    model.save_pretrained(root / "adapter")
    save_label_maps(model, str(root / "adapter"))
    return root / "adapter"


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.evaluate_memory", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--images", type=int, nargs="+", default=[2000, 8000], help="image counts to compare")
    p.add_argument("--dir", type=Path, default=None, help="where the generated data go (default: a temp dir)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.dir or Path(scratch)
        make_images(root / "data", max(args.images))
        adapter = make_adapter(root)
        rows = []
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        for count in args.images:
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, str(adapter), str(root / "data"), str(count)],
                capture_output=True, text=True, check=True, env=env,
            )  # fmt: skip
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| images | RSS after loading (MB) | peak RSS (MB) | RSS at the end (MB) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']} | {r['after_load_mb']:.0f} | {r['peak_mb']:.0f} | {r['end_mb']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
