"""Range checks of the numeric training options of ``deltatune train``/``compare``, made when the command line
is parsed, before the output folder is touched.

Without them a negative or NaN learning rate, a batch size of 0 or an accumulation of 0 reached torch or the
trainer only when the run had started: a message naming no flag (or a ``ZeroDivisionError``), and a run folder
left behind. Each failure here is one line naming the flag, the value and the valid range.

Choices made: the learning rate must be finite and above 0 (0 is accepted by torch, but a run with it trains
nothing and would publish an untrained adapter as trained; ``--do_train false`` is the way to evaluate a model
as loaded); ``--max_grad_norm 0`` (transformers' way to turn clipping off) is accepted, a negative or NaN one
is not (transformers would silently skip clipping).
"""

from __future__ import annotations

import math
from typing import Any

from .run_parser import CommandError

__all__ = ["check_training_values"]

#: field → (lowest, lowest allowed itself, highest, highest allowed itself, what the range is in words).
_RANGES: dict[str, tuple[float, bool, float, bool, str]] = {
    "learning_rate": (0.0, False, math.inf, False, "must be a finite number > 0"),
    "weight_decay": (0.0, True, math.inf, False, "must be a finite number >= 0"),
    "max_grad_norm": (0.0, True, math.inf, False, "must be a finite number >= 0 (0 turns clipping off)"),
    "warmup_steps": (
        0.0,
        True,
        math.inf,
        False,
        "must be a finite number >= 0 (a step count, or below 1 a fraction of the steps)",
    ),
    "warmup_ratio": (0.0, True, 1.0, True, "must be a number from 0 to 1"),
    "adam_beta1": (0.0, True, 1.0, False, "must be a number from 0 up to (not including) 1"),
    "adam_beta2": (0.0, True, 1.0, False, "must be a number from 0 up to (not including) 1"),
    "adam_epsilon": (0.0, True, math.inf, False, "must be a finite number >= 0"),
    "label_smoothing_factor": (0.0, True, 1.0, False, "must be a number from 0 up to (not including) 1"),
    "num_train_epochs": (-math.inf, False, math.inf, False, "must be a finite number"),
}
#: Counts that must be whole numbers of at least 1.
_AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
#: Counts that must be whole numbers of at least 0.
_AT_LEAST_ZERO = ("dataloader_num_workers",)
#: ``*_steps`` field → the strategy field under which it is used (``"steps"``).
_STEP_FIELDS = {
    "logging_steps": "logging_strategy",
    "eval_steps": "eval_strategy",
    "save_steps": "save_strategy",
}


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"  # -1.0 → -1, 1e-3 → 0.001, nan, inf
    return str(getattr(value, "value", value))


def _fail(name: str, value: Any, rule: str) -> CommandError:
    return CommandError(f"--{name} {_plain(value)}: {rule}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(name, value, "must be a number")
    return float(value)


def check_training_values(training: dict[str, Any], options: Any = None) -> None:
    """Refuses a numeric training option outside its range, before anything runs.

    Args:
        training: The ``TrainingArguments`` keyword arguments as parsed (recipe defaults under the user's flags).
        options: deltatune's own options (``full_learning_rate``), when there are any.

    Raises:
        CommandError: one line naming the flag, its value and the valid range.
    """
    for name, (low, low_ok, high, high_ok, rule) in _RANGES.items():
        if training.get(name) is None:
            continue
        number = _number(name, training[name])
        if math.isnan(number) or number < low or number > high or (number == low and not low_ok):
            raise _fail(name, training[name], rule)
        if (number == high and not high_ok) or (math.isinf(number) and "finite" in rule):
            raise _fail(name, training[name], rule)
    full = getattr(options, "full_learning_rate", None)
    if full is not None and not (math.isfinite(full) and full > 0):
        raise _fail("full_learning_rate", full, "must be a finite number > 0")
    for name in _AT_LEAST_ONE:
        value = training.get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise _fail(name, value, "must be a whole number of at least 1")
    for name in _AT_LEAST_ZERO:
        value = training.get(name)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise _fail(name, value, "must be a whole number of at least 0")
    for name, strategy in _STEP_FIELDS.items():
        value = training.get(name)
        if value is None or _plain(training.get(strategy)) != "steps":
            continue
        number = _number(name, value)
        if not (math.isfinite(number) and number > 0):
            raise _fail(
                name,
                value,
                f"must be a finite number > 0 with --{strategy} steps (a step count, or below 1 a fraction "
                "of the steps)",
            )
    _check_length(training)


def _check_length(training: dict[str, Any]) -> None:
    """A training run must have a length: ``--max_steps`` > 0, or else ``--num_train_epochs`` > 0."""
    if training.get("do_train") is False:
        return
    max_steps = training.get("max_steps")
    max_steps = -1 if max_steps is None else max_steps
    epochs = training.get("num_train_epochs")
    if max_steps > 0 or epochs is None or epochs > 0:
        return
    if max_steps == -1:
        raise CommandError(
            f"--num_train_epochs {_plain(epochs)} trains nothing; pass a number of epochs > 0 (or --max_steps N "
            "> 0), or --do_train false to only evaluate the model as loaded"
        )
    raise CommandError(
        f"--max_steps {max_steps} with --num_train_epochs {_plain(epochs)} trains nothing; pass --max_steps N > 0 "
        "or --num_train_epochs > 0, or --do_train false to only evaluate the model as loaded"
    )
