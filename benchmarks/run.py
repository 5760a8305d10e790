"""deltatune vs peft vs the floor: training step, inference latency and peak memory.

Run from the repository root::

    python -m benchmarks.run                 # ViT-Small shape, batch 8, all four methods (a few minutes)
    python -m benchmarks.run --quick         # smoke run: batch 2, fewer repeats
    python -m benchmarks.run --model base --json results.json
    python -m benchmarks.run --workloads excess --threads 1 --timer cpu --pairs 30   # cost above the floor

Timings are interleaved: every repeat runs each variant in turn (the order rotates between repeats) so that
machine noise hits every side alike; the tables show medians over all measured steps. Peak memory is
measured once per variant in a fresh subprocess (peak RSS on CPU, ``max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch

from .excess import bench_excess
from .report import format_report
from .workloads import (
    LIBRARIES,
    METHODS,
    Settings,
    Variant,
    build_base,
    build_variant,
    infer_step,
    make_inputs,
    set_merged,
    sync,
    train_step,
)

WORKLOADS = ("train", "infer", "merged", "memory", "excess")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "small", "base"], default="small", help="ViT shape")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; 2 with --quick)")
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)
    )
    p.add_argument(
        "--workloads",
        default="train,infer,merged,memory",
        help="comma-separated subset of train,infer,merged,memory,excess (excess: each method's cost above the "
        "floor, adjacent single steps, --pairs groups; see benchmarks/excess.py)",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="merged: alternating base/merged pairs; excess: groups per method (default 30; 6 with --quick)",
    )
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; 2 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant per round (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast")
    p.add_argument(
        "--timer",
        choices=["wall", "cpu"],
        default="wall",
        help="wall clock (default) or process CPU time: steadier on a shared machine with --threads 1",
    )
    p.add_argument("--full", action="store_true", help="also time full fine-tuning as a reference")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 2, 2 repeats, 2 steps")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 8)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.steps = args.steps or (2 if args.quick else 3)
    args.pairs = args.pairs or (6 if args.quick else 30)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.bf16 = args.device.startswith("cuda") if args.bf16 is None else args.bf16
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.methods = [m for m in args.methods.split(",") if m]
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        model=args.model, batch=args.batch, device=args.device, bf16=args.bf16, threads=args.threads
    )


def summarise(rounds: list[list[float]]) -> dict[str, Any]:
    """Median, quartiles and minimum (seconds) of all timings, plus the median of each round (for
    ratios paired within a round, which cancel load that drifts between rounds)."""
    samples = [t for r in rounds for t in r]
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {
        "median": statistics.median(samples),
        "p25": q[0],
        "p75": q[2],
        "min": min(samples),
        "n": len(samples),
        "rounds": [statistics.median(r) for r in rounds],
    }


def timed(fn: Any, settings: Settings, clock: Any = time.perf_counter) -> float:
    sync(settings)
    t0 = clock()
    fn()
    sync(settings)
    return clock() - t0


def interleave(
    names: list[str], run_one: Any, args: argparse.Namespace, settings: Settings, prepare: Any = None
) -> dict[str, dict[str, float]]:
    """Round-robin over ``names`` (order rotated each round); ``run_one(name)`` runs one timed step and
    ``prepare(name)``, when given, sets a variant up (untimed) before its steps."""
    for name in names:
        if prepare is not None:
            prepare(name)
        for _ in range(args.warmup):
            run_one(name)
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    samples: dict[str, list[list[float]]] = {n: [] for n in names}
    for rnd in range(args.repeats):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            if prepare is not None:
                prepare(name)
            gc.collect()
            samples[name].append(
                [timed(lambda n=name: run_one(n), settings, clock) for _ in range(args.steps)]
            )
    return {n: summarise(s) for n, s in samples.items()}


def variant_names(methods: list[str], full: bool, workload: str = "train") -> list[str]:
    """The variants of a workload; ``floor-tokens`` (and ``floor-dora``, with DoRA) only matter for the training
    step."""
    floors = ["floor", "floor-tokens"] if workload == "train" else ["floor"]
    if workload == "train" and "dora" in methods:
        floors.append("floor-dora")
    names = floors + [f"{lib}/{m}" for m in methods for lib in LIBRARIES]
    return [*names, "full"] if full else names


def bench_train(variants: dict[str, Variant], args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    pixels, labels = make_inputs(settings)
    return interleave(
        list(variants), lambda n: train_step(variants[n], pixels, labels, settings), args, settings
    )


def bench_infer(variants: dict[str, Variant], args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Inference latency: the bare base, every adapter unmerged and merged (merge toggled untimed)."""
    pixels, _ = make_inputs(settings)
    for v in variants.values():
        v.model.eval()
        v.optimizer = None
    names = ["base"]
    for name, v in variants.items():
        if v.library in LIBRARIES:
            names += [f"{name}:unmerged", f"{name}:merged"]

    def variant(key: str) -> Variant:
        name = key.partition(":")[0]
        return variants["floor" if name == "base" else name]

    def prepare(key: str) -> None:  # merge / unmerge, untimed
        set_merged(variant(key), key.endswith(":merged"))

    return interleave(names, lambda k: infer_step(variant(k), pixels, settings), args, settings, prepare)


def bench_merged(
    variants: dict[str, Variant], args: argparse.Namespace, settings: Settings
) -> dict[str, Any]:
    """Merged inference vs the bare base, resolved step by step: for each adapter, ``args.pairs`` pairs of
    one base forward and one merged forward back to back (order flipped every pair), and the median of the
    per-pair ratios. Adjacent steps share the machine's state, so this resolves ratios near 1.00 that the
    round-robin ``infer`` workload (whole rounds apart) cannot."""
    pixels, _ = make_inputs(settings)
    base = variants["floor"]
    base.model.eval()
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    out: dict[str, Any] = {}
    for name, v in variants.items():
        if v.library not in LIBRARIES:
            continue
        v.model.eval()
        v.optimizer = None
        set_merged(v, True)
        for _ in range(args.warmup):
            infer_step(v, pixels, settings)
            infer_step(base, pixels, settings)
        ratios = []
        for i in range(args.pairs):
            first, second = (v, base) if i % 2 == 0 else (base, v)
            t_first = timed(lambda m=first: infer_step(m, pixels, settings), settings, clock)
            t_second = timed(lambda m=second: infer_step(m, pixels, settings), settings, clock)
            merged_t, base_t = (t_first, t_second) if i % 2 == 0 else (t_second, t_first)
            ratios.append(merged_t / base_t)
        flops = _forward_flops(v.model, pixels) / _forward_flops(base.model, pixels)
        dispatch_s = _wrapper_overhead_s(v.model)
        base_s = statistics.median(
            timed(lambda: infer_step(base, pixels, settings), settings) for _ in range(3)
        )
        set_merged(v, False)
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[name] = {
            "ratio": statistics.median(ratios),
            "p25": q[0],
            "p75": q[2],
            "pairs": len(ratios),
            "flops_ratio": flops,
            "wrapper_overhead_s": dispatch_s,
            "overhead_bound": 1.0 + dispatch_s / base_s,
        }
    return out


def _forward_flops(model: torch.nn.Module, pixels: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(pixel_values=pixels)
    return float(counter.get_total_flops())


def _wrapper_overhead_s(model: torch.nn.Module, calls: int = 2000) -> float:
    """Extra time per forward that the adapter wrappers add on top of their base layers when merged:
    each wrapper is called on a one-token input (so the Python dispatch is all that is measured) against
    its own base layer, the difference summed over wrappers."""
    total = 0.0
    wrappers = [m for m in model.modules() if isinstance(getattr(m, "base_layer", None), torch.nn.Module)]
    with torch.inference_mode():
        for wrapper in wrappers:
            base_layer = wrapper.base_layer
            features = getattr(base_layer, "in_features", None)
            if features is None:
                continue
            x = torch.zeros(1, 1, features)
            best = {}
            for fn in (wrapper, base_layer, wrapper, base_layer):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(x)
                elapsed = (time.perf_counter() - t0) / calls
                best[id(fn)] = min(best.get(id(fn), elapsed), elapsed)
            total += max(0.0, best[id(wrapper)] - best[id(base_layer)])
    return total


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter (VmHWM) of this process; False where Linux does not allow it.

    ``import torch`` alone peaks higher than a small model's training step, so the peak is measured from
    the moment the model is built, not from process start.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB; the lifetime peak RSS as a fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Runs in a fresh process: builds ``variant``, runs 3 training steps, reports peak memory (MiB)."""
    import peft  # noqa: F401

    import deltatune  # noqa: F401  (every worker imports the same libraries, so the baseline is equal)

    settings = settings_from(args)
    torch.set_num_threads(settings.threads)
    v = build_variant(variant, build_base(settings), settings)
    pixels, labels = make_inputs(settings)
    gc.collect()
    reset = reset_peak_rss()
    before = status_mib("VmRSS")
    if settings.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated() / 2**20
    for _ in range(3):
        train_step(v, pixels, labels, settings)
    sync(settings)
    peak = status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"peak_rss_mib": peak, "rss_before_mib": before, "peak_reset": float(reset)}
    if settings.device_type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_before_mib"] = base_alloc
    return out


def bench_memory(names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One fresh subprocess per variant (so each peak is its own)."""
    results: dict[str, Any] = {}
    base_cmd = [sys.executable, "-m", "benchmarks.run", "--model", args.model, "--batch", str(args.batch)]
    base_cmd += ["--threads", str(args.threads), "--device", args.device]
    base_cmd += ["--bf16" if args.bf16 else "--no-bf16"]
    root = Path(__file__).resolve().parent.parent
    for name in names:
        proc = subprocess.run(
            [*base_cmd, "--memory-worker", name], capture_output=True, text=True, cwd=root, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker for {name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import peft
    import transformers

    import deltatune

    cpu = platform.processor()
    with_model = Path("/proc/cpuinfo")
    if with_model.exists():
        for line in with_model.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "deltatune": getattr(deltatune, "__version__", "dev"),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores_visible": len(os.sched_getaffinity(0)),
        "gpu": gpu,
        "load_avg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args)))
        return {}
    settings = settings_from(args)
    torch.set_num_threads(settings.threads)
    names = variant_names(args.methods, args.full)
    result: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {
            **vars(settings),
            "repeats": args.repeats,
            "steps": args.steps,
            "warmup": args.warmup,
            "pairs": args.pairs,
            "timer": args.timer,
        },
        "environment": environment(args),
    }
    t0 = time.perf_counter()
    if {"train", "infer", "merged", "excess"} & set(args.workloads):
        base = build_base(settings)
        variants = {n: build_variant(n, base, settings) for n in names}
        del base
        if "train" in args.workloads:
            result["train"] = bench_train(variants, args, settings)
        if "excess" in args.workloads:
            pixels, labels = make_inputs(settings)
            clock = time.process_time if args.timer == "cpu" else time.perf_counter
            result["excess"] = bench_excess(
                variants,
                lambda n, c: timed(lambda: train_step(variants[n], pixels, labels, settings), settings, c),
                args.methods,
                args.pairs,
                args.warmup,
                clock,
            )
        keep = variant_names(args.methods, False, "infer")
        if "infer" in args.workloads:
            result["infer"] = bench_infer({n: variants[n] for n in keep}, args, settings)
        if "merged" in args.workloads:
            result["merged"] = bench_merged({n: variants[n] for n in keep}, args, settings)
        del variants
        gc.collect()
    if "memory" in args.workloads:
        result["memory"] = bench_memory(variant_names(args.methods, args.full, "memory"), args)
    result["environment"]["load_avg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t0
    print(format_report(result, args.methods))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nJSON written to {args.json}")
    return result


if __name__ == "__main__":
    main()
