"""Ops per training step and host time per step: deltatune vs peft vs the floor, the CPU proxy of the GPU cost.

On a GPU an adapter's cost is mostly the operations it issues (each is a dispatcher call on the host and
usually a kernel launch), not its FLOPs. A tiny model at batch 1 on the CPU is host-bound in the same way,
so counting the ATen operations of one training step there, and timing the step, says how much work each
library makes the host do per step. On CUDA the script also counts the kernels launched.

    python -m benchmarks.ops                     # tiny ViT, 32 px, batch 1, fp32 and bf16 autocast, every method
    python -m benchmarks.ops --model small --batch 8 --precisions bf16

Columns: ``ops`` = ATen operator calls per step (every dispatcher-level call, nested ones included, as the
profiler records them), ``copies`` = ``aten::copy_`` + ``aten::_to_copy`` calls (casts and copies),
``kernels`` (CUDA only) = device kernels launched, ``host ms`` = median host time of a step (CPU: process
time of the whole step; CUDA: wall time until the step is issued, without synchronising), ``saved MiB`` =
what autograd keeps for backward (unique storages, parameters excluded: the step's activation memory, the
same on any device), and the deltatune / peft ratio of each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/ops.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop chatter

import torch

from .workloads import METHODS, Settings, build_base, build_variant, make_inputs, train_step


def count_ops(step: Any, device_type: str) -> dict[str, int]:
    """ATen calls, copies and (on CUDA) kernels of one call of ``step``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device_type == "cuda":
            torch.cuda.synchronize()
    ops = copies = kernels = 0
    for event in prof.events():
        name = event.name
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernels += 1
            continue
        if name.startswith("aten::"):
            ops += 1
            if name in ("aten::copy_", "aten::_to_copy"):
                copies += 1
    out = {"ops": ops, "copies": copies}
    if device_type == "cuda":
        out["kernels"] = kernels
    return out


def saved_mib(step: Any, model: torch.nn.Module) -> float:
    """MiB of the tensors autograd saves for backward during ``step`` (unique storages, parameters
    excluded): the activation memory a step holds at its peak, on any device."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values()) / 2**20


def host_ms(step: Any, repeats: int, device_type: str) -> float:
    """Median host time of ``step`` in ms: on the CPU the process's CPU time (steady on a shared machine with
    one thread), on CUDA the wall time to issue the step (no synchronisation)."""
    clock = time.process_time if device_type == "cpu" else time.perf_counter
    times = []
    for _ in range(repeats):
        t0 = clock()
        step()
        times.append((clock() - t0) * 1e3)
    return statistics.median(times)


def measure(names: list[str], settings: Settings, repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    base = build_base(settings)
    pixels, labels = make_inputs(settings)
    results: dict[str, dict[str, float]] = {}
    variants = {name: build_variant(name, base, settings) for name in names}
    for name, variant in variants.items():

        def step(v: Any = variant) -> None:
            train_step(v, pixels, labels, settings)

        for _ in range(warmup):
            step()
        torch.manual_seed(0)
        results[name] = {**count_ops(step, settings.device_type)}
        torch.manual_seed(0)
        results[name]["saved_mib"] = saved_mib(step, variant.model)
    for _ in range(3):  # interleaved timing rounds
        for name, variant in variants.items():
            t = host_ms(
                lambda v=variant: train_step(v, pixels, labels, settings), repeats, settings.device_type
            )
            results[name].setdefault("host_ms_rounds", []).append(t)  # type: ignore[union-attr]
    for r in results.values():
        r["host_ms"] = statistics.median(r.pop("host_ms_rounds"))  # type: ignore[arg-type]
    return results


def table(results: dict[str, dict[str, float]], methods: list[str], title: str) -> str:
    cuda = any("kernels" in r for r in results.values())
    head = (
        ["variant", "ops", "copies"]
        + (["kernels"] if cuda else [])
        + ["host ms", "saved MiB", "ops dt/peft", "host dt/peft", "saved dt/peft"]
    )
    lines = [f"#### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, *ratios: str) -> str:
        r = results[name]
        cells = [name, f"{r['ops']:.0f}", f"{r['copies']:.0f}"]
        if cuda:
            cells.append(f"{r['kernels']:.0f}")
        cells += [f"{r['host_ms']:.2f}", f"{r['saved_mib']:.2f}", *(ratios or ("", "", ""))]
        return "| " + " | ".join(cells) + " |"

    lines.append(row("floor"))
    for m in methods:
        ours, theirs = results[f"deltatune/{m}"], results[f"peft/{m}"]
        lines.append(row(f"peft/{m}"))
        ratios = [ours[k] / theirs[k] if theirs[k] else float("nan") for k in ("ops", "host_ms", "saved_mib")]
        lines.append(row(f"deltatune/{m}", *(f"{r:.2f}" for r in ratios)))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "small", "base"], default="tiny")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image-size", type=int, default=32, help="32 px: 5 tokens, so a step is host-bound")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32 and/or bf16 (autocast)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    names = ["floor"] + [f"{lib}/{m}" for m in methods for lib in ("peft", "deltatune")]
    report: dict[str, Any] = {"settings": vars(args) | {"json": None}, "results": {}}
    out = []
    for precision in [x for x in args.precisions.split(",") if x]:
        settings = Settings(
            model=args.model,
            batch=args.batch,
            image_size=args.image_size,
            device=args.device,
            bf16=precision == "bf16",
            threads=args.threads,
        )
        with contextlib.redirect_stderr(sys.stderr):
            results = measure(names, settings, args.repeats, args.warmup)
        report["results"][precision] = results
        title = f"{args.model} ViT, {args.image_size} px, batch {args.batch}, {precision}, {args.device}"
        out.append(table(results, methods, title))
    print("\n".join(out))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
