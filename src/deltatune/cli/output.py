"""Output for people: the console the commands print to, one line per epoch with a progress bar per phase,
warnings shown once with a count, and the full log of a run saved as ``train.log`` in its output folder;
:func:`esc` for everything user-supplied that goes into rich markup.

On a terminal a transient progress bar runs while training (and one while evaluating); every epoch leaves
one line (train loss, eval loss, accuracy, top-5, images/s, elapsed, ETA). When stdout is not a terminal
(a pipe, a file, CI) the same lines are printed as plain text, without bars, colours or wrapping.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

from transformers import TrainerCallback

from .errors import escaped_line, printable

__all__ = [
    "LOG_NAME",
    "EpochReporter",
    "OnceFilter",
    "StderrHandler",
    "WarningDigest",
    "console",
    "esc",
    "run_log",
]

#: The full log of a run, in its output folder.
LOG_NAME = "train.log"
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _handle_log_error(handler: logging.FileHandler, record: logging.LogRecord) -> None:
    """``train.log`` is best effort: a write that fails with an ``OSError`` (a full disk) is dropped silently,
    so logging's "--- Logging error ---" traceback does not bury the run's own one-line error; any other
    logging error (a bad format string) is reported as logging always does."""
    if isinstance(sys.exc_info()[1], OSError):
        return
    logging.FileHandler.handleError(handler, record)


def console(file: Any = None) -> Any:
    """A rich console for people: colours and live bars on a terminal; plain, unwrapped text otherwise
    (a long file name is never broken across lines when the output is piped)."""
    from rich.console import Console

    screen = Console(file=file, highlight=False)
    if screen.is_terminal:
        return screen
    return Console(file=file, highlight=False, width=200, soft_wrap=True, no_color=True, emoji=False)


def stderr_is_terminal() -> bool:
    """Whether standard error is a terminal: progress bars (which redraw with carriage returns) only then; piped
    into a file or a CI log, ``predict`` and ``evaluate`` draw none, as ``train`` prints plain lines."""
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (ValueError, AttributeError):  # closed, or a stand-in without isatty
        return False


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes to whatever ``sys.stderr`` is at the time (so lines printed during a live
    progress bar appear above it instead of tearing it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # logging.StreamHandler assigns it; the property wins
        pass


class OnceFilter(logging.Filter):
    """Lets each message through once (``compare`` explains the automatic choices once, not per run)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class WarningDigest:
    """Shows each kind of warning once on the console and counts its repeats; every occurrence goes to the
    run's log. Warnings that differ only in numbers (an index, a running count) or quoted names (a file)
    are the same kind.

    Args:
        file_logger: Logger that writes to ``train.log`` only (None: nothing is logged).
    """

    def __init__(self, file_logger: logging.Logger | None = None) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.first: dict[tuple[str, str], str] = {}
        self.variants: dict[tuple[str, str], set[str]] = {}
        self.file_logger = file_logger

    def show(
        self, message: Any, category: type[Warning], filename: str, lineno: int, *_: Any, **__: Any
    ) -> None:
        """A ``warnings.showwarning`` replacement."""
        text = str(message)
        quoted = re.findall(r"'[^']*'|\"[^\"]*\"", text)
        key = (category.__name__, re.sub(r"\d+", "#", re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)))
        self.counts[key] = self.counts.get(key, 0) + 1
        self.variants.setdefault(key, set()).add("".join(quoted))
        if self.file_logger is not None:
            self.file_logger.warning("%s: %s (%s:%d)", category.__name__, text, filename, lineno)
        if self.counts[key] == 1:
            self.first[key] = text
            sys.stderr.write(f"[deltatune] warning: {escaped_line(text)}\n")

    def summary(self) -> list[str]:
        """One line per warning that came more than once: how many times, and its first text."""
        lines = []
        for key, count in self.counts.items():
            if count > 1:
                variants = len(self.variants[key])
                about = f", about {variants} different names" if variants > 1 else ""
                lines.append(f"warning shown once above, {count} times in all{about}: {self.first[key]}")
        return lines


@contextlib.contextmanager
def run_log(output_dir: str | None, enabled: bool = True) -> Iterator[WarningDigest]:
    """Saves the full log of a run to ``output_dir/train.log`` (deltatune's messages at every level,
    transformers' at its verbosity, each warning, the per-step training logs) and shows warnings once with
    a count.

    The log is a stream, appended line by line (a killed run keeps what it logged), unlike the atomic
    result files. A run that stops on an exception logs it there (with its traceback) when it had logged
    anything; a log left empty, or one this call created for a run that stopped before writing its run record
    (refused before it started), is removed: such a run leaves no litter. Yields the
    :class:`WarningDigest`; its summary is printed when the block ends.
    """
    import os

    import transformers

    if not enabled or output_dir is None:
        yield WarningDigest()
        return
    from ..train.outputs import RUN_RECORD_NAME

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOG_NAME)
    created = not os.path.exists(path)
    refused = False  # stopped before the run record was written: the log this run created goes too
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.handleError = functools.partial(_handle_log_error, handler)  # type: ignore[method-assign]
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    handler.setLevel(logging.DEBUG)
    package = logging.getLogger("deltatune")
    library = transformers.utils.logging.get_logger("transformers")
    file_only = logging.getLogger("deltatune.run_log")
    saved_level, saved_propagate = package.level, file_only.propagate
    saved_handlers = [(h, h.level) for h in package.handlers]
    for existing in package.handlers:
        if existing.level == logging.NOTSET:
            existing.setLevel(package.getEffectiveLevel())  # the console keeps its level when ours drops
    package.setLevel(logging.DEBUG)
    file_only.propagate = False
    file_only.setLevel(logging.DEBUG)
    for logger in (package, library, file_only):
        logger.addHandler(handler)
    digest = WarningDigest(file_only)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = digest.show
            yield digest
    except BaseException as exc:
        refused = created and not os.path.exists(os.path.join(output_dir, RUN_RECORD_NAME))
        if handler.stream is not None and handler.stream.tell() > 0:  # the run had started: say how it ended
            reason = (
                getattr(exc, "reason", None) or "interrupted (Ctrl-C)"  # RunInterrupted: Ctrl-C or SIGTERM
                if isinstance(exc, KeyboardInterrupt)
                else f"{type(exc).__name__}: {exc}"
            )
            file_only.error("the run stopped: %s", reason, exc_info=exc)
        raise
    finally:
        for logger in (package, library, file_only):
            logger.removeHandler(handler)
        with contextlib.suppress(OSError):  # a full disk: the run's own error is the one to report
            handler.close()
        with contextlib.suppress(OSError):
            if refused or os.path.getsize(path) == 0:
                os.remove(path)
        package.setLevel(saved_level)
        for existing, level in saved_handlers:
            existing.setLevel(level)
        file_only.propagate = saved_propagate
        for line in digest.summary():
            sys.stderr.write(f"[deltatune] {escaped_line(line)}\n")


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _epoch_label(epoch: float) -> str:
    """The trainer's epoch as the table shows it: ``2`` at an epoch's end, ``1.4`` where training stopped inside
    one (``--max_steps``, a fractional ``--num_train_epochs``)."""
    whole = round(epoch)
    return str(whole) if abs(epoch - whole) < 5e-3 else f"{epoch:.2f}".rstrip("0")


class EpochReporter(TrainerCallback):
    """Replaces transformers' progress bar and printed log dicts: one line per epoch (train loss, eval loss,
    accuracy, top-5, images/s, elapsed, ETA) and, on a terminal, a transient bar while training and one
    while evaluating. The per-step log dicts go to ``train.log``.

    Args:
        screen: The rich console (see :func:`console`).
        bars: Show progress bars (default: when the console is a terminal).
        title: A line printed when training starts (e.g. which run of a comparison).
        header: Print the column header when training starts.
    """

    HEADER = f"{'epoch':>7}  {'loss':>8}  {'eval loss':>9}  {'accuracy':>8}  {'top-5':>6}  {'images/s':>8}  {'elapsed':>7}  {'ETA':>7}"

    def __init__(
        self, screen: Any, bars: bool | None = None, title: str | None = None, header: bool = True
    ) -> None:
        self.screen = screen
        self.num_train = 0
        self.header = header
        self.bars = screen.is_terminal if bars is None else bars
        self.title = title
        self.file_logger = logging.getLogger("deltatune.run_log")
        self.rows: list[dict[str, Any]] = []
        self._progress: Any = None
        self._train_task: Any = None
        self._eval_task: Any = None
        self._pending: dict[str, Any] | None = None
        self._losses: list[tuple[int, float]] = []  # (steps covered, mean loss) logged this epoch
        self._last_logged_step = 0

    # ---- training ---------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self._start = time.perf_counter()
        self._first_step = state.global_step  # a resumed run: the rate is of the steps this process took
        loader = kwargs.get("train_dataloader")
        dataset = getattr(loader, "dataset", None)
        self.num_train = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else 0
        self._epochs = max(1, math.ceil(args.num_train_epochs)) if args.max_steps <= 0 else None
        self._last_logged_step = state.global_step
        if self.title:
            self.screen.print(printable(self.title), markup=False)
        if self.header:
            self.screen.print(self.HEADER, markup=False, style="bold")
        self.file_logger.info("%s", self.HEADER)
        if self.bars and not args.disable_tqdm:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]} ·"),
                TimeRemainingColumn(),
                console=self.screen,
                transient=True,
            )
            self._progress.start()
            self._train_task = self._progress.add_task(
                "training", total=state.max_steps, completed=state.global_step, unit="steps"
            )

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush()
        self._epoch_start = time.perf_counter()
        self._epoch_first_step = state.global_step
        self._losses = []
        if self._progress is not None:
            total = f"/{self._epochs}" if self._epochs else ""
            self._progress.update(self._train_task, description=f"epoch {math.floor(state.epoch) + 1}{total}")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._train_task, completed=state.global_step)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the loss since the last log, so the epoch's loss is complete; on every process (logging gathers
        # the loss across processes, so all of them must log at the same step)
        control.should_log = True
        if not state.is_world_process_zero:
            return
        seconds = max(time.perf_counter() - getattr(self, "_epoch_start", self._start), 1e-9)
        steps = state.global_step - getattr(self, "_epoch_first_step", 0)
        per_step = args.train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
        images = steps * per_step if steps else 0
        images = min(images, self.num_train) if self.num_train else images
        self._history = state.log_history  # the trainer's own samples/s record is read from it at _flush
        self._pending = {
            "epoch": round(float(state.epoch or 0.0), 4),  # fractional where max_steps ends inside an epoch
            "images_per_s": images / seconds,
            "step": state.global_step,
            "max_steps": state.max_steps,
            "wait_eval": str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "epoch",
        }

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.file_logger.info("step %d: %s", state.global_step, json.dumps(logs, default=str))
        if "loss" in logs:
            covered = max(state.global_step - self._last_logged_step, 1)
            self._losses.append((covered, float(logs["loss"])))
            self._last_logged_step = state.global_step
            if self._pending is not None and not self._pending["wait_eval"]:
                self._flush()

    def on_prediction_step(
        self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **kwargs: Any
    ) -> None:
        if self._progress is None:
            return
        if self._eval_task is None:
            total = (
                len(eval_dataloader)
                if eval_dataloader is not None and hasattr(eval_dataloader, "__len__")
                else None
            )
            self._eval_task = self._progress.add_task("evaluating", total=total, unit="batches")
        self._progress.advance(self._eval_task)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if self._progress is not None and self._eval_task is not None:
            self._progress.remove_task(self._eval_task)
            self._eval_task = None
        if not state.is_world_process_zero:
            return
        metrics = metrics or {}
        if self._pending is None:  # an evaluation within an epoch (eval_strategy steps) or after training
            self._pending = {
                "epoch": None,
                "images_per_s": None,
                "step": state.global_step,
                "max_steps": state.max_steps,
                "wait_eval": True,
            }
        self._pending.update(
            eval_loss=metrics.get("eval_loss"),
            accuracy=metrics.get("eval_accuracy"),
            top5=metrics.get("eval_top5_accuracy"),
        )
        self._flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # ---- rows -------------------------------------------------------------------------------------
    def _flush(self) -> None:
        row = self._pending
        if row is None:
            return
        self._pending = None
        if self._losses and row["epoch"] is not None:
            steps = sum(n for n, _ in self._losses)
            row["loss"] = sum(n * loss for n, loss in self._losses) / steps
        elapsed = time.perf_counter() - getattr(self, "_start", time.perf_counter())
        done, total = row["step"], row["max_steps"]
        row["elapsed"] = elapsed
        taken = done - getattr(self, "_first_step", 0)
        row["eta"] = elapsed / taken * (total - done) if taken > 0 and total else None
        if row.get("images_per_s") is not None:  # one number everywhere: the record metrics.json keeps
            recorded = [
                h["train_samples_per_second_epoch"]
                for h in getattr(self, "_history", [])
                if h.get("step") == row["step"] and "train_samples_per_second_epoch" in h
            ]
            if recorded:
                row["images_per_s"] = recorded[-1]
        self.rows.append(row)
        epoch = (
            f"{_epoch_label(row['epoch'])}/{self._epochs}"
            if row["epoch"] is not None and getattr(self, "_epochs", None)
            else (_epoch_label(row["epoch"]) if row["epoch"] is not None else f"@{row['step']}")
        )
        speed = "-" if row.get("images_per_s") is None else f"{row['images_per_s']:.0f}"
        line = (
            f"{epoch:>7}  {_num(row.get('loss')):>8}  {_num(row.get('eval_loss')):>9}  "
            f"{_num(row.get('accuracy')):>8}  {_num(row.get('top5')):>6}  {speed:>8}  "
            f"{_clock(elapsed):>7}  {('-' if row['eta'] is None else _clock(row['eta'])):>7}"
        )
        self.screen.print(line, markup=False)
        self.file_logger.info("%s", line)


def esc(value: Any) -> str:
    """``value`` safe to embed in rich markup, on one line: control characters (ESC sequences, BEL ...) and line
    breaks shown as visible escapes and ``[`` escaped, so a label, path or folder name prints as written and
    never as markup, terminal commands or a forged table row."""
    from rich.markup import escape

    return escape(escaped_line(value))
