"""Which ``checkpoint-N`` a run can resume from, skipping one a kill left half-written.

``Trainer._save_checkpoint`` (transformers 5) fills ``checkpoint-N`` in this order: the adapter (each file
written atomically by deltatune), the optimizer, scheduler and RNG states, then ``trainer_state.json``;
only after that are older checkpoints rotated away. A process killed while saving therefore leaves a
``checkpoint-N`` without a readable ``trainer_state.json`` next to the intact previous checkpoint.
transformers' ``get_last_checkpoint`` would still pick the broken folder, and ``Trainer.train`` resumes
from a folder without ``trainer_state.json`` silently at step 0. :func:`resolve_resume_checkpoint` picks
the newest *complete* checkpoint instead and refuses an incomplete one by name.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

__all__ = ["checkpoint_problem", "latest_complete_checkpoint", "resolve_resume_checkpoint"]

TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be resumed from, or None when it is a complete checkpoint.

    A checkpoint is complete when its ``trainer_state.json`` (the last file transformers writes) parses
    as a trainer state.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return f"{path!r} is not a directory"
    state_file = os.path.join(path, TRAINER_STATE_NAME)
    if not os.path.isfile(state_file):
        return f"{path!r} has no {TRAINER_STATE_NAME} (the run was probably killed while saving it)"
    try:
        with open(state_file, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{state_file!r} is unreadable ({err}); the run was probably killed while writing it"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"{state_file!r} is not a trainer state (no 'global_step')"
    return None


def _checkpoints_newest_first(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    found = []
    for entry in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(entry)
        if match and os.path.isdir(os.path.join(output_dir, entry)):
            found.append((int(match.group(1)), os.path.join(output_dir, entry)))
    return [path for _, path in sorted(found, reverse=True)]


def latest_complete_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (incomplete newer ones skipped with a
    warning), or None when there is none."""
    for path in _checkpoints_newest_first(os.fspath(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping incomplete checkpoint: %s", problem)
    return None


def resolve_resume_checkpoint(output_dir: str | os.PathLike[str] | None, resume: Any) -> Any:
    """The checkpoint ``Trainer.train(resume_from_checkpoint=resume)`` should use.

    Args:
        output_dir: The run's output directory (searched when ``resume`` is True).
        resume: None/False (start fresh; returned as is), True (the newest complete checkpoint in
            ``output_dir``) or a checkpoint path (checked).

    Raises:
        ValueError: when ``resume`` is True and ``output_dir`` holds no complete checkpoint, or when the
            given checkpoint is incomplete — naming what is missing and the newest complete checkpoint
            next to it, if any.
    """
    if resume is None or resume is False:
        return resume
    if resume is True:
        directory = os.fspath(output_dir) if output_dir is not None else ""
        found = latest_complete_checkpoint(directory) if directory else None
        if found is None:
            raise ValueError(
                f"resume_from_checkpoint=True but {directory!r} holds no complete {PREFIX_CHECKPOINT_DIR}-N "
                "folder; pass a checkpoint path, or start without resume_from_checkpoint"
            )
        logger.info("resuming from the newest complete checkpoint: %s", found)
        return found
    path = os.fspath(resume)
    problem = checkpoint_problem(path)
    if problem is None:
        return resume
    sibling = latest_complete_checkpoint(os.path.dirname(os.path.normpath(path)) or ".")
    hint = f"resume from {sibling!r} instead" if sibling else "no complete checkpoint is next to it"
    raise ValueError(f"cannot resume: {problem}; {hint}")
