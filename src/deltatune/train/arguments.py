"""``TrainingArguments`` that also accept the guide's spellings, and an up-front precision check.

transformers 5 renamed ``evaluation_strategy`` to ``eval_strategy``; the PEFT guide still uses the old
name. :class:`TrainingArguments` here is transformers' dataclass plus that one field, mapped in
``__post_init__`` with a one-line notice, so the guide's code runs unchanged and ``HfArgumentParser``
offers ``--evaluation_strategy`` too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

logger = logging.getLogger(__name__)

__all__ = [
    "TrainingArguments",
    "accelerator_name",
    "check_precision",
    "cpu_threads",
    "map_legacy_kwargs",
    "precision_label",
]

#: Below this many parameters a CPU run uses one thread unless told otherwise, when its forward cost is
#: unknown (see :func:`cpu_threads`).
SMALL_MODEL_PARAMETERS = 20_000_000
#: Below this forward cost (GFLOP per example) a CPU run uses one thread unless told otherwise.
SMALL_MODEL_GFLOP = 0.1

#: The thread counts of the cpu_threads blocks the current thread (or task) is in, innermost last: a
#: context variable, so blocks entered by two threads at once do not see or pop each other's entries.
_CHOSEN: ContextVar[tuple[int, ...]] = ContextVar("deltatune_cpu_threads", default=())

#: Old TrainingArguments keyword → transformers 5 keyword.
LEGACY_ARGUMENT_NAMES = {"evaluation_strategy": "eval_strategy"}


def map_legacy_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Renames the guide's old ``TrainingArguments`` keywords in ``kwargs`` (a copy), logging one line each.

    Raises:
        ValueError: if both the old and the new spelling are given with different values.
    """
    out = dict(kwargs)
    for old, new in LEGACY_ARGUMENT_NAMES.items():
        if old not in out:
            continue
        value = out.pop(old)
        if new in out and out[new] not in (None, "no", value):
            raise ValueError(f"both {old}={value!r} and {new}={out[new]!r} were given; pass only {new}")
        out[new] = value
        logger.warning("TrainingArguments: %s=%r is spelled %s in transformers 5; mapped", old, value, new)
    return out


def accelerator_name() -> str | None:
    """The accelerator torch can use here (``"cuda"``, ``"xpu"``, ``"mps"``, ``"npu"``), or None for CPU only."""
    if torch.cuda.is_available():
        return "cuda"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return "npu"
    if torch.backends.mps.is_available():
        return "mps"
    return None


@contextmanager
def cpu_threads(
    model: torch.nn.Module, requested: int | None, use_cpu: bool, gflop: float | None = None
) -> Iterator[int]:
    """Sets torch's CPU thread count for a run and restores it afterwards; yields the count used.

    ``requested`` wins when given. Otherwise a small model trained on the CPU (and with ``OMP_NUM_THREADS``
    unset) uses one thread: its matrix products are too small to gain from more, and on a busy machine
    extra threads spin and wait for cores (measured: 5.5 s vs about 100 s for one epoch of the offline
    default, 0.03 GFLOP per example, on two cores shared with other work). Small means a forward cost
    ``gflop`` (per example) under :data:`SMALL_MODEL_GFLOP` (the 0.03 GFLOP offline default is well below
    it; a 224 px ViT, 0.5 GFLOP and up, gains from every core), or, when the cost is unknown, fewer than
    :data:`SMALL_MODEL_PARAMETERS` parameters. Inside another ``cpu_threads`` block (the command line's,
    around ``DeltaTrainer.train``'s), the outer block's choice stands unless ``requested`` is given.
    """
    previous = torch.get_num_threads()
    on_cpu = use_cpu or accelerator_name() is None
    if requested is not None and requested > 0:
        torch.set_num_threads(requested)
    elif _CHOSEN.get():
        pass  # inside another cpu_threads block (the CLI's, around DeltaTrainer's): its choice stands
    elif on_cpu and "OMP_NUM_THREADS" not in os.environ and previous > 1:
        size = sum(p.numel() for p in model.parameters())
        small = gflop < SMALL_MODEL_GFLOP if gflop is not None else size < SMALL_MODEL_PARAMETERS
        if small:
            torch.set_num_threads(1)
            cost = f"{gflop:.2f} GFLOP per example, " if gflop is not None else ""
            logger.info(
                "CPU threads: 1 (a small model, %s%.1fM parameters, trains fastest single-threaded; "
                "--num_threads N changes it)",
                cost,
                size / 1e6,
            )
    token = _CHOSEN.set((*_CHOSEN.get(), torch.get_num_threads()))
    try:
        yield torch.get_num_threads()
    finally:
        _CHOSEN.reset(token)
        torch.set_num_threads(previous)


def check_precision(args: transformers.TrainingArguments) -> str:
    """Checks that the requested mixed precision can run here and returns what will be used.

    Args:
        args: The training arguments (``fp16``, ``bf16``, ``fp16_full_eval``, ``bf16_full_eval``, ``use_cpu``).

    Returns:
        ``"fp32"``, ``"fp16 mixed precision"`` or ``"bf16 mixed precision"``.

    Raises:
        ValueError: when fp16 is asked for without a GPU-class device, or bf16 where it is not supported,
            naming what this machine has and what to pass instead.
    """
    device = None if getattr(args, "use_cpu", False) else accelerator_name()
    if (args.fp16 or getattr(args, "fp16_full_eval", False)) and device is None:
        where = "training runs on the CPU (use_cpu=True)" if accelerator_name() else "this machine has no GPU"
        raise ValueError(
            f"fp16 mixed precision needs a GPU (CUDA, XPU, NPU or MPS) but {where}; drop --fp16 to train in "
            "fp32, or pass --bf16 --use_cpu for bfloat16 on the CPU"
        )
    if args.bf16 or getattr(args, "bf16_full_eval", False):
        if device is None and not getattr(args, "use_cpu", False):
            raise ValueError(
                "bf16 mixed precision was requested but this machine has no GPU; add --use_cpu to train in "
                "bfloat16 on the CPU, or drop --bf16 to train in fp32"
            )
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                "bf16 mixed precision was requested but this CUDA GPU does not support bfloat16; use --fp16 "
                "instead, or drop --bf16 to train in fp32"
            )
    return precision_label(args)


def precision_label(args: transformers.TrainingArguments) -> str:
    """A short description of the training precision ``args`` select."""
    if args.fp16:
        return "fp16 mixed precision"
    if args.bf16:
        return "bf16 mixed precision"
    return "fp32"


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' ``TrainingArguments`` that also accepts the PEFT guide's spellings.

    Every transformers field works as usual. In addition:

    Attributes:
        evaluation_strategy: The guide's name for ``eval_strategy`` (renamed in transformers 5); mapped to
            it with a one-line notice.

    The fp16/bf16 request is checked before transformers sees it, so an impossible precision fails here
    with a message saying what to pass instead.
    """

    evaluation_strategy: str | None = field(
        default=None,
        metadata={"help": "Old spelling of --eval_strategy (transformers < 5); mapped to it."},
    )

    def __post_init__(self) -> None:
        if self.evaluation_strategy is not None:
            mapped = map_legacy_kwargs(
                {"evaluation_strategy": self.evaluation_strategy, "eval_strategy": None}
            )
            current = str(getattr(self.eval_strategy, "value", self.eval_strategy))
            if current not in ("no", str(mapped["eval_strategy"])):
                raise ValueError(
                    f"both evaluation_strategy={self.evaluation_strategy!r} and eval_strategy={current!r} were "
                    "given; pass only eval_strategy"
                )
            self.eval_strategy = mapped["eval_strategy"]
            self.evaluation_strategy = None
        check_precision(self)
        super().__post_init__()
