"""Automatic training precision: bf16/fp16 autocast where it pays, fp32 where it does not.

``deltatune train`` (and :func:`~deltatune.train.recipe.run_training`) resolves ``precision="auto"`` once the
base model and one example are known:

- **CUDA**: bf16 mixed precision when the GPU supports it (Ampere and newer), else fp16 (the guide's choice).
- **CPU**: bf16 autocast when the CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16) *and*
  the model does enough work per example for the faster matrix products to outweigh autocast's casts.
  Measured with ``python -m benchmarks.precision`` on a 2-core AMX CPU (batch 32, LoRA r=16, one training
  step, fp32 time / bf16 time): ViT-Small shape at 224 px (4.4 GFLOP per example) 1.46x; hidden 256 at
  224 px (2.0 GFLOP) 1.39x; hidden 128 at 224 px (0.5 GFLOP) 1.21x; at 96 px (0.36 GFLOP) 0.97x; the
  offline default at 32 px (0.04 GFLOP) 0.51x, i.e. twice as slow. Hence the threshold
  :data:`CPU_BF16_MIN_GFLOP` on the forward cost of one example, set conservatively.
- **Other accelerators** (MPS, XPU, NPU): fp32 unless asked (their bf16/fp16 support varies).

An explicit ``--bf16``/``--fp16`` or ``precision="fp32"|"bf16"|"fp16"`` always wins; the choice and its
reason are logged.
"""

from __future__ import annotations

import logging
import platform
from typing import Any

import torch
import transformers

from .._defaults import PRECISION_CHOICES
from .arguments import accelerator_name, check_precision, precision_label

logger = logging.getLogger(__name__)

__all__ = [
    "CPU_BF16_MIN_GFLOP",
    "PRECISION_CHOICES",
    "check_request",
    "cpu_bf16_support",
    "forward_gflop",
    "resolve_precision",
]

#: Forward GFLOP per example from which CPU bf16 autocast is chosen automatically (see the module doc).
CPU_BF16_MIN_GFLOP = 1.0


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_support() -> str | None:
    """The CPU's native bfloat16 arithmetic (``"AMX"``, ``"AVX512-BF16"``, ``"Arm BF16"``), or None."""
    cpu = getattr(torch, "cpu", None)
    checks = (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16"))
    for attribute, name in checks:
        probe = getattr(cpu, attribute, None)
        if probe is not None:
            try:
                if probe():
                    return name
            except Exception:  # a torch build without the CPU probe
                pass
    flags = _cpuinfo_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if platform.machine().lower() in ("aarch64", "arm64") and "bf16" in flags:
        return "Arm BF16"
    return None


def forward_gflop(model: torch.nn.Module, batch: dict[str, Any]) -> float | None:
    """GFLOP of one forward pass per example of ``batch`` (counted by torch's FlopCounterMode), or None
    when the model cannot be counted."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    size = next((int(v.shape[0]) for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim()), 1)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs)
        return counter.get_total_flops() / 1e9 / max(size, 1)
    except Exception as error:  # an exotic model: fall back to fp32 rather than fail the run
        logger.debug("could not count the model's FLOPs: %r", error)
        return None
    finally:
        model.train(was_training)


def check_request(bf16: bool, fp16: bool, requested: str) -> str | None:
    """The mixed precision ``--bf16``/``--fp16`` already ask for (None if neither), checked against
    ``requested``.

    Raises:
        ValueError: when ``requested`` is neither ``"auto"`` nor that precision.
    """
    explicit = "bf16" if bf16 else "fp16" if fp16 else None
    if explicit is not None and requested not in ("auto", explicit):
        raise ValueError(f"--{explicit} contradicts --precision {requested}; pass only one of them")
    return explicit


def resolve_precision(
    args: transformers.TrainingArguments, requested: str, gflop: float | None = None
) -> str:
    """Sets ``args.bf16``/``args.fp16`` for ``requested`` and returns a one-line reason (also logged).

    Args:
        args: The run's training arguments; updated in place. When ``args.bf16`` or ``args.fp16`` is already
            set, or ``accelerate launch`` set a mixed precision through its environment, that choice is kept.
        requested: One of :data:`PRECISION_CHOICES`.
        gflop: The model's forward cost per example (:func:`forward_gflop`); for ``"auto"`` on a CPU it
            decides (None: fp32).

    Raises:
        ValueError: for an unknown ``requested``, a request that contradicts ``args``, or a precision this
            machine cannot run (see :func:`~deltatune.train.arguments.check_precision`).
    """
    if requested not in PRECISION_CHOICES:
        raise ValueError(
            f"precision={requested!r} is not valid; choose one of {', '.join(map(repr, PRECISION_CHOICES))}"
        )
    source = "requested"
    launcher = getattr(args, "mixed_precision", "no")  # accelerate launch's config, via its environment
    if not (args.bf16 or args.fp16) and launcher in ("bf16", "fp16"):
        source = "accelerate config (ACCELERATE_MIXED_PRECISION)"
        explicit = check_request(launcher == "bf16", launcher == "fp16", requested)
    else:
        explicit = check_request(args.bf16, args.fp16, requested)
    if explicit is not None:
        _apply(args, explicit)
        reason = f"{precision_label(args)} ({source})"
    elif requested != "auto":
        _apply(args, requested)
        reason = f"{precision_label(args)} (requested)"
    else:
        choice, why = _automatic(args, gflop)
        _apply(args, choice)
        reason = f"{precision_label(args)} (automatic: {why})"
    check_precision(args)
    logger.info("precision: %s", reason)
    return reason


def _apply(args: transformers.TrainingArguments, choice: str) -> None:
    """Sets the flag and what ``TrainingArguments.__post_init__`` derives from it (``mixed_precision``,
    which the Trainer hands to accelerate: without it the flag alone does not autocast)."""
    if choice == "bf16":
        args.bf16 = True
        if accelerator_name() is None:
            args.use_cpu = True  # bf16 autocast on the CPU (the only device here)
    elif choice == "fp16":
        args.fp16 = True
    if hasattr(args, "mixed_precision"):
        args.mixed_precision = choice if choice in ("bf16", "fp16") else "no"


def _automatic(args: transformers.TrainingArguments, gflop: float | None) -> tuple[str, str]:
    device = None if getattr(args, "use_cpu", False) else accelerator_name()
    off = "--precision fp32 or --no_bf16 turns it off"
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"this GPU supports bfloat16; {off}"
        return "fp16", "this GPU lacks bfloat16; --precision fp32 turns it off"
    if device is not None:
        return (
            "fp32",
            f"mixed precision on {device} is not chosen automatically; pass --precision bf16 or fp16",
        )
    support = cpu_bf16_support()
    if support is None:
        return "fp32", "this CPU has no native bfloat16 arithmetic (AVX512-BF16, AMX or Arm BF16)"
    if gflop is None:
        return (
            "fp32",
            f"this CPU has {support} but the model's cost could not be measured; --precision bf16 forces it",
        )
    if gflop < CPU_BF16_MIN_GFLOP:
        return (
            "fp32",
            f"the CPU has {support}, but at {gflop:.2f} GFLOP per example the model is too small for bf16 "
            f"autocast to pay off (threshold {CPU_BF16_MIN_GFLOP:g}); --precision bf16 forces it",
        )
    return "bf16", f"the CPU has {support} and the model costs {gflop:.1f} GFLOP per example; {off}"
