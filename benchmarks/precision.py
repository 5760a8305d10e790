"""fp32 vs bf16 autocast on this CPU: one LoRA training step per model shape, interleaved.

Backs ``deltatune.train.precision``'s threshold (bf16 autocast on a CPU only from
``CPU_BF16_MIN_GFLOP`` forward GFLOP per example): for each shape it prints the forward cost per example
(torch's FlopCounterMode) and the fp32/bf16 step-time ratio (> 1: bf16 is faster).

Run from the repository root::

    python -m benchmarks.precision                  # the default shapes, batch 32, all cores
    python -m benchmarks.precision --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch
from transformers import ViTConfig, ViTForImageClassification

from deltatune import LoraConfig, get_peft_model
from deltatune.train.precision import CPU_BF16_MIN_GFLOP, cpu_bf16_support, forward_gflop

#: name → (hidden, layers, heads, image px, patch px)
SHAPES = {
    "offline-default (128, 32 px)": (128, 6, 4, 32, 8),
    "hidden 128, 96 px": (128, 6, 2, 96, 8),
    "hidden 128, 224 px": (128, 6, 2, 224, 16),
    "hidden 256, 224 px": (256, 6, 4, 224, 16),
    "ViT-Small shape (384, 224 px)": (384, 6, 6, 224, 16),
}


def build(shape: tuple[int, int, int, int, int]) -> torch.nn.Module:
    hidden, layers, heads, image, patch = shape
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=image,
        patch_size=patch,
        num_labels=10,
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=16,
        target_modules=["query", "value"],
        lora_dropout=0.1,
        modules_to_save=["classifier"],
    )
    return get_peft_model(ViTForImageClassification(config), lora)


def measure(shape: tuple[int, int, int, int, int], batch: int, rounds: int, steps: int) -> dict[str, Any]:
    model = build(shape)
    image = shape[3]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    pixels, labels = torch.randn(batch, 3, image, image), torch.randint(0, 10, (batch,))
    gflop = forward_gflop(model, {"pixel_values": pixels[:1]})

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for bf16 in (False, True):  # warm-up
        step(bf16)
    ratios = []
    for rnd in range(rounds):
        times = {}
        for bf16 in (False, True) if rnd % 2 == 0 else (True, False):
            t0 = time.perf_counter()
            for _ in range(steps):
                step(bf16)
            times[bf16] = (time.perf_counter() - t0) / steps
        ratios.append(times[False] / times[True])
    return {"gflop": gflop, "fp32_over_bf16": statistics.median(ratios)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved fp32/bf16 rounds per shape")
    p.add_argument("--steps", type=int, default=2, help="timed steps per precision per round")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    support = cpu_bf16_support()
    print(
        f"CPU bfloat16: {support or 'none (bf16 is emulated; expect it slower)'}; {torch.get_num_threads()} "
        f"threads, batch {args.batch}, LoRA r=16 on query/value; auto threshold {CPU_BF16_MIN_GFLOP:g} GFLOP"
    )
    print("| shape | forward GFLOP / example | fp32 time / bf16 time | auto picks |")
    print("|---|--:|--:|---|")
    results = {}
    for name, shape in SHAPES.items():
        r = measure(shape, args.batch, args.rounds, args.steps)
        gflop = r["gflop"] or 0.0
        pick = "bf16" if support and gflop >= CPU_BF16_MIN_GFLOP else "fp32"
        print(f"| {name} | {gflop:.2f} | {r['fp32_over_bf16']:.2f}x | {pick} |", flush=True)
        results[name] = r
    return results


if __name__ == "__main__":
    main()
