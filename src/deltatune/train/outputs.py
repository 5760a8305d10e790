"""One output folder = one run: which files a run writes, the record that identifies the run, and the
check made before a run writes into a folder that already holds files.

A run writes :data:`RUN_RECORD_NAME` (what was trained: method, model, data, settings) first. A later run into
the same folder is accepted only when it is the same run (to resume it); a different one is refused unless
the user asks to overwrite, and then only the files runs write are removed.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .._files import read_json
from .resume import latest_complete_checkpoint

__all__ = ["OUTPUT_FILES", "RUN_RECORD_NAME", "OutputDirError", "prepare_output_dir", "same_run"]

RUN_RECORD_NAME = "deltatune_run.json"


class OutputDirError(ValueError):
    """The output folder cannot take this run (it holds another one, or is not a folder)."""


#: Files ``deltatune train`` writes; ``--overwrite_output_dir`` removes these (and checkpoint-*) only.
OUTPUT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "labels.json",
    "preprocessor_config.json",
    "training_args.json",
    "metrics.json",
    "training_curve.png",
    "README.md",
    RUN_RECORD_NAME,
    "model.safetensors",
    "config.json",
    "compare.md",
    "compare.png",
    "compare.json",
    "eval_results.json",
    "confusion_matrix.png",
    "train_results.json",
    "all_results.json",
    "trainer_state.json",
    "report.html",
    "train.log",
)
#: Suffixes of further files runs write (a method's rank heatmap ``<method>_ranks.png``, its resumable state).
OUTPUT_SUFFIXES = ("_ranks.png", "_state.safetensors")


def same_run(previous: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether a folder's run record ``previous`` describes the run ``record`` describes (every key of
    ``record`` equal)."""
    return all(previous.get(key) == value for key, value in record.items())


def prepare_output_dir(
    directory: str, record: dict[str, Any], overwrite: bool, resume: Any, main_process: bool = True
) -> str | None:
    """Refuses a directory holding a different run unless ``overwrite``; resolves ``resume``.

    Args:
        directory: The output folder.
        record: What identifies the new run (compared with the folder's :data:`RUN_RECORD_NAME`).
        overwrite: Remove the files a previous run wrote instead of refusing.
        resume: ``--resume_from_checkpoint``: None/False, ``"true"`` (the newest complete checkpoint) or a path.
        main_process: False on the other processes of a torchrun/accelerate run.

    With ``main_process=False`` (the other processes of a torchrun/accelerate run) the directory is
    neither checked nor cleaned: only ``resume`` is resolved.

    Returns:
        The checkpoint to resume from (None to start fresh).

    Raises:
        OutputDirError: when the directory holds another run (or unknown files) and ``overwrite`` is off.
    """
    entries = os.listdir(directory) if os.path.isdir(directory) and main_process else []
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputDirError(f"--output_dir {directory!r} is a file; pass a directory")
    if entries and not overwrite:
        record_path = os.path.join(directory, RUN_RECORD_NAME)
        previous = read_json(record_path, "run record") if os.path.isfile(record_path) else None
        if not isinstance(previous, dict) or not same_run(previous, record):
            what = "files not written by deltatune" if previous is None else "a different run"
            raise OutputDirError(
                f"--output_dir {directory!r} already holds {what} ({', '.join(sorted(entries)[:4])}...); pass "
                "--overwrite_output_dir to replace it, or choose another --output_dir"
            )
    if entries and overwrite:
        for entry in entries:
            path = os.path.join(directory, entry)
            if entry.startswith(PREFIX_CHECKPOINT_DIR) and os.path.isdir(path):
                shutil.rmtree(path)
            elif entry in OUTPUT_FILES or entry.endswith(OUTPUT_SUFFIXES):
                os.remove(path)
    if resume in (None, "", False):
        return None
    if str(resume).lower() in ("true", "last", "latest"):
        last = latest_complete_checkpoint(directory)  # skips a checkpoint a kill left half-written
        if last is None:
            raise OutputDirError(
                f"--resume_from_checkpoint: no complete checkpoint-N folder in {directory!r} to resume from"
            )
        return last
    if not os.path.isdir(str(resume)):
        raise OutputDirError(f"--resume_from_checkpoint {resume!r} is not a directory")
    return str(resume)
