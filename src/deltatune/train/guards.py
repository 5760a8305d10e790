"""Stops a run whose loss turns NaN/inf before a poisoned state reaches a checkpoint.

How it fits ``transformers.Trainer`` (5.x, ``Trainer._run_epoch``): every micro-batch goes through
``training_step``; after the optimiser step ``global_step`` is incremented, ``on_step_end`` runs (the
``DefaultFlowCallback`` decides there whether to log, evaluate or save) and only then
``_maybe_log_save_evaluate`` logs, evaluates and calls ``_save_checkpoint``. So:

- ``DeltaTrainer.training_step`` hands each loss to :meth:`NonFiniteLossGuard.observe`, which records the
  first non-finite step **on the device** (no ``.item()``, no host sync in the step);
- :meth:`NonFiniteLossGuard.on_step_end` / ``on_epoch_end`` read that record once, and only when the
  step is about to log, evaluate, save or stop (a point where transformers syncs anyway). Under
  ``torchrun`` the record is reduced over the processes (they all reach these points at the same step),
  so every rank stops together. A non-finite loss raises :class:`NonFiniteLossError` naming the step
  before anything is logged, evaluated or saved;
- ``DeltaTrainer._save_checkpoint`` calls :func:`refuse_non_finite_checkpoint` as a backstop: no
  ``checkpoint-N`` is written while the guard has seen a non-finite loss or any trainable parameter is
  non-finite (this holds even when the guard callback was removed).

The last good ``checkpoint-N`` therefore stays the newest one, and the error says where it is.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "observe_loss", "refuse_non_finite_checkpoint"]

#: "No non-finite loss seen yet" (larger than any step number).
_NONE_SEEN = 2**62
_ADVICE = (
    "lower the learning_rate, keep gradient clipping on (max_grad_norm), train in fp32 or bf16 instead of fp16, "
    "and check the inputs of that step for NaN/inf"
)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss (or adapter weight); raised before that state is saved.

    Attributes:
        step: The optimiser step (1-based, as in ``checkpoint-N`` and the logs) whose loss was non-finite,
            or the step whose checkpoint was refused.
        last_checkpoint: The newest ``checkpoint-N`` folder in the output directory (written before the
            failure), or None.
    """

    def __init__(self, message: str, step: int, last_checkpoint: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


def _last_checkpoint(output_dir: str | None) -> str | None:
    if not output_dir or not os.path.isdir(output_dir):
        return None
    return get_last_checkpoint(output_dir)


def _resume_hint(last: str | None) -> str:
    if last is None:
        return "no checkpoint was written before it"
    return f"the last good checkpoint is {last} (resume with resume_from_checkpoint={last!r})"


def _distributed_world() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


class NonFiniteLossGuard(TrainerCallback):
    """Raises :class:`NonFiniteLossError` when the training loss becomes NaN or ±inf.

    ``DeltaTrainer`` registers it by itself. The check costs nothing inside a step: losses are compared on
    the device, and the result is read only at steps that log, evaluate, save or end training — so the
    error comes at the first such step after the loss went bad, naming the step where it did, and before
    that state is logged, evaluated or written to a checkpoint.

    Transformers' ``logging_nan_inf_filter`` (on by default) hides NaN losses from the logged average;
    this guard sees each step's loss before that filter.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forgets what was seen (called at the start of each ``train()``)."""
        self._first_step: torch.Tensor | None = None  # () int64 on the loss device
        self._first_value: torch.Tensor | None = None  # () float32: the first non-finite loss
        self.tripped_step: int | None = None

    # ---- fed by DeltaTrainer.training_step ---------------------------------------------------------
    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Records ``loss`` of optimiser step ``step`` (1-based) without leaving the device.

        Args:
            loss: The (detached) training loss of one micro-batch, any shape.
            step: The optimiser step this micro-batch contributes to.
        """
        loss = loss.detach()
        bad = ~torch.isfinite(loss).all()
        if self._first_step is None or self._first_step.device != loss.device:
            self._first_step = torch.full((), _NONE_SEEN, dtype=torch.int64, device=loss.device)
            self._first_value = torch.zeros((), dtype=torch.float32, device=loss.device)
        assert self._first_value is not None
        is_first = bad & (self._first_step == _NONE_SEEN)
        self._first_step = torch.where(is_first, step, self._first_step)
        self._first_value = torch.where(is_first, loss.float().sum(), self._first_value)  # nan or ±inf

    # ---- the check ---------------------------------------------------------------------------------
    def first_bad_step(self, device: torch.device | str | None = None) -> int | None:
        """The first optimiser step with a non-finite loss on any process, or None (one host sync; a
        collective under ``torch.distributed``, so every process must call it at the same point)."""
        if self.tripped_step is not None:
            return self.tripped_step
        first = self._first_step
        if first is None:
            first = torch.full((), _NONE_SEEN, dtype=torch.int64, device=device or "cpu")
        if _distributed_world():
            first = first.clone()
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        step = int(first)
        if step == _NONE_SEEN:
            return None
        self.tripped_step = step
        return step

    def raise_if_tripped(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """Raises :class:`NonFiniteLossError` (after cancelling any pending log/eval/save) when a
        non-finite loss was seen."""
        step = self.first_bad_step(args.device)
        if step is None:
            return
        what = "became non-finite (on another process)"
        if self._first_step is not None and self._first_value is not None and int(self._first_step) == step:
            what = f"became {float(self._first_value)}"
        self._fail(args, state, control, f"training loss {what} at step {step}", step)

    def _fail(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, what: str, step: int
    ) -> None:
        control.should_save = control.should_evaluate = control.should_log = False
        control.should_training_stop = True
        last = _last_checkpoint(args.output_dir)
        message = (
            f"{what} (detected at step {state.global_step}); training stopped and nothing from step {step} on "
            f"was saved — {_resume_hint(last)}. To avoid it: {_ADVICE}"
        )
        logger.error(message)
        raise NonFiniteLossError(message, step, last)

    # ---- TrainerCallback ---------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.reset()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # DefaultFlowCallback has already decided this step's log/eval/save/stop; check only then.
        if (
            control.should_log
            or control.should_evaluate
            or control.should_save
            or control.should_training_stop
        ):
            self.raise_if_tripped(args, state, control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.raise_if_tripped(args, state, control)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # A fallback for trainers that bypass DeltaTrainer.training_step (with logging_nan_inf_filter=False
        # the logged average shows it). Logs are the same on every process, so all of them stop together.
        loss = (logs or {}).get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            step = int(state.global_step)
            self.tripped_step = step
            self._fail(args, state, control, f"logged training loss is {loss} at step {step}", step)


def observe_loss(trainer: Any, loss: torch.Tensor) -> None:
    """Hands ``loss`` of the step in progress to the trainer's :class:`NonFiniteLossGuard`, if any."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, NonFiniteLossGuard):
            callback.observe(loss, int(trainer.state.global_step) + 1)


def refuse_non_finite_checkpoint(trainer: Any) -> None:
    """Raises :class:`NonFiniteLossError` instead of letting ``trainer`` write a poisoned ``checkpoint-N``.

    Refuses when a :class:`NonFiniteLossGuard` of the trainer has seen a non-finite loss, or when any
    trainable parameter holds NaN/inf (one host sync per checkpoint; parameters are identical on every
    process under DDP, so every process decides the same).
    """
    step = int(trainer.state.global_step)
    last = _last_checkpoint(trainer.args.output_dir)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, NonFiniteLossGuard):
            bad = callback.first_bad_step(trainer.args.device)
            if bad is not None:
                message = (
                    f"refusing to write checkpoint-{step}: the training loss became non-finite at step {bad}; "
                    f"{_resume_hint(last)}. To avoid it: {_ADVICE}"
                )
                raise NonFiniteLossError(message, bad, last)
    params = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    if not params:
        return
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in params])
    if bool(finite.all()):
        return
    names = [n for (n, _), ok in zip(params, finite.tolist(), strict=True) if not ok]
    message = (
        f"refusing to write checkpoint-{step}: {len(names)} trainable tensor(s) hold NaN/inf (first: {names[0]}); "
        f"{_resume_hint(last)}. To avoid it: {_ADVICE}"
    )
    logger.error(message)
    raise NonFiniteLossError(message, step, last)
