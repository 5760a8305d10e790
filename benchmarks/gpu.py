"""Every GPU measurement in one call: adapter steps vs peft and the floor (eager and compiled, bf16 and fp16),
ops and kernels per step, peak memory, CUDA graphs, and whole runs against the guide's recipe.

Sized to finish in under 8 minutes on one H200 with its defaults (ViT-B/16, 224 px, batch 128, the PEFT
guide's adapter settings, fused AdamW; 3,000 + 500 generated JPEGs of 512 px for the whole runs)::

    python -m benchmarks.gpu                        # everything; tables on stdout, JSON under --out
    python -m benchmarks.gpu --parts step,e2e       # a subset: step, compile, graphs, e2e
    python -m benchmarks.gpu --quick --device cpu   # the same code on tiny shapes (how CI smoke-tests it)

Parts:

- **step**: for bf16 and fp16 autocast (fp16 with a GradScaler, as ``Trainer(fp16=True)`` runs), the
  training step of the floor (frozen base, forward + backward to the input), peft and deltatune for every
  method, interleaved rounds, the median of CUDA-event times; the step's peak memory above the resident
  model (``max_memory_allocated``); and one profiled step per variant: ATen ops, kernels, copies, and the
  host time to issue the step (no synchronisation; with fused AdamW the GradScaler hands ``found_inf`` to
  the kernel, so fp16 steps do not sync either, but its ``update`` may).
- **compile**: the same steps with every transformer block compiled (``torch.compile`` per block: one
  compilation, reused by the twelve blocks), bf16, eager and compiled side by side.
- **graphs**: floor and deltatune LoRA compiled with ``mode="reduce-overhead"`` (CUDA graphs), bf16.
- **e2e**: whole runs, one epoch each, in fresh processes: the guide's recipe as a GPU user runs it (peft +
  Trainer + torchvision ``set_transform``, ``fp16=True``, ``dataloader_num_workers=0``, batch 128 × 4) and
  ``deltatune train`` with its defaults (precision, workers and data path chosen automatically), then with
  ``--data_pipeline fast`` and ``gpu`` forced; images/s, accuracy, and images/s against the adapter-step
  throughput measured in **step**.

Needs peft and torchvision (``pip install -e ".[cli,bench]"``) and, for the guide's recipe, ``datasets``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/gpu.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch

from .ops import count_ops
from .workloads import METHODS, SHAPES, Settings, Variant, build_base, build_variant, make_inputs

PRECISIONS = ("bf16", "fp16")


# ---- steps ------------------------------------------------------------------------------------------
def step_fn(
    v: Variant, settings: Settings, precision: str, pixels: torch.Tensor, labels: torch.Tensor
) -> Any:
    """One training step of ``v`` under ``precision`` autocast (fp16 through a GradScaler)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = v.extra.get("scaler")

    def step() -> None:
        x = pixels.detach().requires_grad_(True) if v.library == "floor" else pixels
        with torch.autocast(settings.device_type, dtype=dtype):
            loss = v.model(pixel_values=x, labels=labels).loss
        (scaler.scale(loss) if scaler is not None else loss).backward()
        v.step += 1
        if v.optimizer is not None:
            if scaler is not None:
                scaler.step(v.optimizer)
                scaler.update()
            else:
                v.optimizer.step()
            if v.method == "adalora":
                v.model.base_model.update_and_allocate(v.step)
            v.optimizer.zero_grad(set_to_none=True)

    return step


def prepare(v: Variant, settings: Settings, precision: str) -> None:
    """Fused AdamW on CUDA (the issue's setting) and a GradScaler for fp16."""
    if v.optimizer is not None and settings.device_type == "cuda":
        params = [p for group in v.optimizer.param_groups for p in group["params"]]
        v.optimizer = torch.optim.AdamW(params, lr=v.optimizer.param_groups[0]["lr"], fused=True)
    v.extra["scaler"] = torch.amp.GradScaler(settings.device_type) if precision == "fp16" else None


def timer(settings: Settings) -> Any:
    """A function timing ``fn()`` in ms: CUDA events on a GPU, the wall clock on a CPU."""
    if settings.device_type == "cuda":

        def cuda_time(fn: Any) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))

        return cuda_time

    def wall(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return wall


def sync(settings: Settings) -> None:
    if settings.device_type == "cuda":
        torch.cuda.synchronize()


def interleaved(
    steps: dict[str, Any], settings: Settings, rounds: int, per_round: int, warmup: int
) -> dict[str, float]:
    """Median step time (ms) of each variant over interleaved rounds (order rotated every round)."""
    time_it = timer(settings)
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    sync(settings)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name] += [time_it(steps[name]) for _ in range(per_round)]
    return {n: statistics.median(v) for n, v in samples.items()}


def peak_memory_mib(step: Any, settings: Settings) -> float | None:
    """Peak device memory of two steps above what was allocated before them (CUDA only)."""
    if settings.device_type != "cuda":
        return None
    sync(settings)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    sync(settings)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def issue_ms(step: Any, settings: Settings, repeats: int = 5) -> float:
    """Median host time to issue a step (no synchronisation after it; the queue is drained before)."""
    times = []
    for _ in range(repeats):
        sync(settings)
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    sync(settings)
    return statistics.median(times)


def variants_for(
    methods: list[str], base: torch.nn.Module, settings: Settings, precision: str
) -> dict[str, Variant]:
    names = ["floor"] + [f"{lib}/{m}" for m in methods for lib in ("peft", "deltatune")]
    out = {}
    for name in names:
        v = build_variant(name, base, settings)
        prepare(v, settings, precision)
        out[name] = v
    return out


def measure_steps(
    args: argparse.Namespace, settings: Settings, precision: str, compile_blocks: bool = False
) -> dict[str, Any]:
    base = build_base(settings)
    pixels, labels = make_inputs(settings)
    variants = variants_for(args.methods, base, settings, precision)
    if compile_blocks:
        # Every variant's blocks share ViTLayer.forward's code object and each variant needs its own cache
        # entry: raise dynamo's recompile limit, and fail rather than fall back to eager when it is hit.
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
        if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
            torch._dynamo.config.fail_on_recompile_limit_hit = True
        for v in variants.values():
            for block in transformer_blocks(v.model):
                block.compile()
    steps = {n: step_fn(v, settings, precision, pixels, labels) for n, v in variants.items()}
    times = interleaved(steps, settings, args.rounds, args.per_round, args.warmup)
    out: dict[str, Any] = {}
    for name, step in steps.items():
        row: dict[str, Any] = {"ms": times[name]}
        if not compile_blocks:
            torch.manual_seed(0)
            row.update(count_ops(step, settings.device_type))
            row["issue_ms"] = issue_ms(step, settings)
            row["peak_mib"] = peak_memory_mib(step, settings)
        out[name] = row
    del variants, steps
    _free(settings)
    return out


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's longest ``ModuleList`` (a ViT's twelve blocks, whatever transformers names them)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    if not lists:
        raise ValueError(f"no list of blocks found in {type(model).__name__}")
    return max(lists, key=len)


def _free(settings: Settings) -> None:
    import gc

    gc.collect()
    if settings.device_type == "cuda":
        torch.cuda.empty_cache()


def measure_graphs(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Floor and deltatune LoRA under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), bf16."""
    base = build_base(settings)
    pixels, labels = make_inputs(settings)
    out: dict[str, Any] = {}
    for name in ("floor", "deltatune/lora"):
        v = build_variant(name, base, settings)
        prepare(v, settings, "bf16")
        mode = "reduce-overhead" if settings.device_type == "cuda" else "default"
        v.model = torch.compile(v.model, mode=mode)
        step = step_fn(v, settings, "bf16", pixels, labels)
        try:
            out[name] = {
                "ms": interleaved({name: step}, settings, args.rounds, args.per_round, args.warmup + 2)[name]
            }
        except Exception as error:  # report, don't stop the other measurements
            out[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        del v, step
        _free(settings)
    return out


# ---- whole runs -------------------------------------------------------------------------------------
#: The e2e part's whole runs: the guide's script, deltatune train with each data pipeline.
E2E_RUNS = ("guide", "deltatune", "deltatune-fast", "deltatune-gpu")


def run_e2e(args: argparse.Namespace, step_results: dict[str, Any] | None) -> dict[str, Any]:
    from .e2e import generate, make_model, run_recipe

    root = args.out / "e2e_jpegs" / f"{args.n_train}_{args.n_val}_{args.classes}_{args.image_px}"
    t0 = time.perf_counter()
    generate(root, args.n_train, args.n_val, args.classes, args.image_px)
    print(f"data: {root} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model = make_model(args.out / "models", args.model, args.classes)
    work = args.out / "e2e_work"
    work.mkdir(parents=True, exist_ok=True)
    on_gpu = args.device.startswith("cuda")
    guide_extra = ("--accumulation", "4") + (("--fp16",) if on_gpu else ())
    runs: dict[str, dict[str, Any]] = {}
    plan = [
        ("guide", "guide", guide_extra),
        ("deltatune", "deltatune", ("--report_to", "none")),
        ("deltatune-fast", "deltatune", ("--report_to", "none", "--data_pipeline", "fast")),
        ("deltatune-gpu", "deltatune", ("--report_to", "none", "--data_pipeline", "gpu")),
    ]
    if not on_gpu:
        plan = [p for p in plan if p[0] != "deltatune-gpu"] + [
            ("deltatune-gpu", "deltatune", ("--report_to", "none", "--data_pipeline", "gpu", "--use_cpu"))
        ]
    for tag, recipe, extra in [p for p in plan if p[0] in args.runs]:
        print(f"whole run: {tag} ...", flush=True)
        try:
            result = run_recipe(recipe, root, model, work, args.batch, 1.0, 42, extra, tag=tag)
        except RuntimeError as error:
            runs[tag] = {"error": str(error)}
            print(f"  failed: {error}", flush=True)
            continue
        result["images_per_second"] = args.n_train / max(result["train_runtime_s"], 1e-9)
        runs[tag] = result
        print(f"  {result['images_per_second']:.0f} img/s, accuracy {result['accuracy']:.4f}", flush=True)
    step_rate = None
    if step_results and "deltatune/lora" in step_results:
        step_rate = args.batch * 1e3 / step_results["deltatune/lora"]["ms"]
    return {"runs": runs, "adapter_step_images_per_second": step_rate}


# ---- report -----------------------------------------------------------------------------------------
def step_table(
    results: dict[str, Any], methods: list[str], title: str, compiled: dict[str, Any] | None
) -> str:
    cuda = any(r.get("kernels") is not None for r in results.values())
    head = [
        "variant",
        "ms/step",
        "vs floor",
        "peft/dt",
        "ops",
        "kernels" if cuda else "copies",
        "issue ms",
        "peak MiB",
    ]
    if compiled:
        head += ["compiled ms", "compiled vs floor"]
    lines = [f"#### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    floor = results["floor"]["ms"]
    floor_c = compiled["floor"]["ms"] if compiled else None

    def row(name: str, ratio: str = "") -> str:
        r = results[name]
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        cells = [name, f"{r['ms']:.2f}", f"{r['ms'] / floor:.2f}", ratio, str(r.get("ops", "-"))]
        cells += [
            str(r.get("kernels" if cuda else "copies", "-")),
            f"{r.get('issue_ms', float('nan')):.1f}",
            peak,
        ]
        if compiled and floor_c:
            c = compiled.get(name, {}).get("ms")
            cells += ["-", "-"] if c is None else [f"{c:.2f}", f"{c / floor_c:.2f}"]
        return "| " + " | ".join(cells) + " |"

    lines.append(row("floor"))
    for m in methods:
        lines.append(row(f"peft/{m}"))
        ratio = results[f"peft/{m}"]["ms"] / results[f"deltatune/{m}"]["ms"]
        lines.append(row(f"deltatune/{m}", f"{ratio:.2f}"))
    return "\n".join(lines) + "\n"


def e2e_table(e2e: dict[str, Any], args: argparse.Namespace) -> str:
    runs = e2e["runs"]
    lines = [
        f"#### Whole runs: one epoch, {args.n_train} + {args.n_val} JPEGs of {args.image_px} px, ViT-{args.model}",
        "",
        "| recipe | images/s | vs guide | accuracy | precision | wall s |",
        "|---|---|---|---|---|---|",
    ]
    guide = runs.get("guide", {}).get("images_per_second")
    for tag, r in runs.items():
        if "error" in r:
            lines.append(f"| {tag} | failed | | | | |")
            continue
        vs = f"{r['images_per_second'] / guide:.1f}x" if guide else "-"
        lines.append(
            f"| {tag} | {r['images_per_second']:.0f} | {vs} | {r['accuracy']:.4f} | {r['precision']} | {r['wall_s']:.0f} |"
        )
    if e2e.get("adapter_step_images_per_second") and "deltatune" in runs and "error" not in runs["deltatune"]:
        share = runs["deltatune"]["images_per_second"] / e2e["adapter_step_images_per_second"]
        lines.append(
            f"\n`deltatune train` reached {100 * share:.0f}% of its adapter-step throughput "
            f"({e2e['adapter_step_images_per_second']:.0f} images/s, LoRA bf16 step)."
        )
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cores": len(os.sched_getaffinity(0)),
    }
    with contextlib.suppress(Exception):
        import peft
        import transformers

        info["transformers"], info["peft"] = transformers.__version__, peft.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="step,compile,graphs,e2e")
    # the guide's five by default (the call is sized for them); IA³ with --methods ...,ia3
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "ia3"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--model", choices=sorted(SHAPES), default=None, help="ViT shape (default base; tiny with --quick)"
    )
    p.add_argument("--batch", type=int, default=None, help="default 128 (4 with --quick)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--per-round", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--image-px", type=int, default=None)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_bench")))
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps (a smoke run)")
    p.add_argument(
        "--runs",
        default=",".join(E2E_RUNS),
        help=f"the whole runs of the e2e part (default all: {','.join(E2E_RUNS)})",
    )
    args = p.parse_args(argv)
    q = args.quick
    args.model = args.model or ("tiny" if q else "base")
    args.batch = args.batch or (4 if q else 128)
    args.rounds = args.rounds or (1 if q else 4)
    args.per_round = args.per_round or (2 if q else 5)
    args.warmup = args.warmup or (1 if q else 3)
    args.n_train = args.n_train or (24 if q else 3000)
    args.n_val = args.n_val or (10 if q else 500)
    args.image_px = args.image_px or (64 if q else 512)
    args.methods = [m for m in args.methods.split(",") if m]
    args.parts = [x for x in args.parts.split(",") if x]
    args.runs = [x for x in args.runs.split(",") if x]
    unknown = sorted(set(args.runs) - set(E2E_RUNS))
    if unknown:
        raise SystemExit(f"unknown --runs {unknown}; choose from {', '.join(E2E_RUNS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    report: dict[str, Any] = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}}
    tables: list[str] = []
    started = time.perf_counter()
    image_size = 224 if not args.quick else 32
    steps: dict[str, Any] = {}
    for part in args.parts:
        t0 = time.perf_counter()
        if part == "step":
            for precision in PRECISIONS:
                settings = Settings(
                    model=args.model, batch=args.batch, image_size=image_size, device=args.device, bf16=True
                )
                steps[precision] = measure_steps(args, settings, precision)
            report["step"] = steps
        elif part == "compile":
            settings = Settings(
                model=args.model, batch=args.batch, image_size=image_size, device=args.device, bf16=True
            )
            try:
                report["compile"] = measure_steps(args, settings, "bf16", compile_blocks=True)
            except Exception as error:  # report it; the other parts still run
                report["compile_error"] = f"{type(error).__name__}: {str(error)[:500]}"
                print(f"compile part failed: {report['compile_error']}", flush=True)
        elif part == "graphs":
            settings = Settings(
                model=args.model, batch=args.batch, image_size=image_size, device=args.device, bf16=True
            )
            report["graphs"] = measure_graphs(args, settings)
        elif part == "e2e":
            report["e2e"] = run_e2e(args, steps.get("bf16"))
        else:
            raise SystemExit(f"unknown part {part!r}; choose from step, compile, graphs, e2e")
        report.setdefault("seconds", {})[part] = round(time.perf_counter() - t0, 1)
        (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2, default=str))
        print(f"[{part} done in {time.perf_counter() - t0:.0f} s]", flush=True)
    title = f"ViT-{args.model}, batch {args.batch}, {args.device} ({report['machine'].get('gpu', platform.processor())})"
    for precision, results in steps.items():
        compiled = report.get("compile") if precision == "bf16" else None
        tables.append(step_table(results, args.methods, f"{title}, {precision} autocast", compiled))
    if "graphs" in report:
        rows = [
            f"| {n} | {r.get('ms', float('nan')):.2f} | {r.get('error', '')} |"
            for n, r in report["graphs"].items()
        ]
        tables.append(
            "#### CUDA graphs (reduce-overhead), bf16\n\n| variant | ms/step | error |\n|---|---|---|\n"
            + "\n".join(rows)
            + "\n"
        )
    if "e2e" in report:
        tables.append(e2e_table(report["e2e"], args))
    text = (
        "\n".join(tables)
        + f"\ntotal {time.perf_counter() - started:.0f} s; {json.dumps(report['machine'])}\n"
    )
    (args.out / "gpu_bench.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
