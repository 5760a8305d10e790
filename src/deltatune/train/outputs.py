"""One output folder = one run: the record that identifies a run, and the check made before a run writes
into a folder that already holds files.

A run writes :data:`RUN_RECORD_NAME` first (``"status": "running"``: what is trained, on what data, with
which training arguments) and marks it ``"finished"`` at the end. Then, before anything is touched:

- a folder holding files deltatune did not write is refused (``--overwrite_output_dir`` removes only what
  deltatune writes, so it is refused too);
- a folder holding another run (any difference in the recorded configuration: method, model, data, adapter
  settings, learning rate, seed, batch sizes, ...; or its data or model folder changed on disk, see
  :mod:`.fingerprint`) is refused, naming the differences; with ``--overwrite_output_dir`` everything the
  previous run wrote is removed first;
- a folder holding the same run is continued only with ``--resume_from_checkpoint``; without it a finished
  run, or one with a complete checkpoint, is refused rather than trained over (an unfinished run without any
  complete checkpoint has nothing to lose and starts over, clean);
- contradictory requests (``--overwrite_output_dir`` with ``--resume_from_checkpoint``, a checkpoint that is
  not complete, or one outside the folder's run) are refused before anything is removed.

Settings that cannot change the result (logging, progress bars, dataloader workers, hub upload,
``save_total_limit``, the output folder itself) are left out of the comparison (:data:`RUN_NEUTRAL_ARGS`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .._files import TMP_PREFIX, read_json, remove_stale_temporaries, write_json
from .fingerprint import fingerprint_changes
from .resume import checkpoint_problem, latest_complete_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "EVALUATE_DIR",
    "EVALUATE_FILES",
    "OUTPUT_FILES",
    "RUN_NEUTRAL_ARGS",
    "RUN_RECORD_NAME",
    "OutputDirError",
    "prepare_output_dir",
    "run_differences",
    "same_run",
    "training_identity",
    "write_run_record",
]

RUN_RECORD_NAME = "deltatune_run.json"
#: Keys of a run record that describe its progress, not the run (left out of the comparison), and the
#: fingerprints of its folders (compared apart, by :func:`~deltatune.train.fingerprint.fingerprint_changes`).
RECORD_BOOKKEEPING = ("status", "fingerprint")
#: Name of a run's log (``deltatune.cli.output.run_log``): alone in a folder without a run record, it is the
#: log of a run refused before it started (left by an earlier version), removed rather than refused.
LOG_NAME = "train.log"
#: Name of the lock file (see :mod:`deltatune.train.lock`); never counted as a file of the folder.
LOCK_NAME = ".deltatune.lock"


class OutputDirError(ValueError):
    """The output folder cannot take this run (it holds another one, is locked, or is not a folder)."""


#: Files deltatune writes into an output folder; ``--overwrite_output_dir`` removes these, the
#: ``checkpoint-*`` folders, sub-folders holding a run record (``deltatune compare``'s runs) and an
#: :data:`EVALUATE_DIR` holding only :data:`EVALUATE_FILES` only.
OUTPUT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
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
    LOG_NAME,
)
#: Suffixes of further files runs write (a method's rank heatmap ``<method>_ranks.png``, its resumable state).
OUTPUT_SUFFIXES = ("_ranks.png", "_state.safetensors")
#: The sub-folder ``deltatune evaluate`` writes into an adapter folder that already holds results, and the
#: files it writes there: the old adapter's scores, removed with the run (only while it holds nothing else).
EVALUATE_DIR = "evaluate"
EVALUATE_FILES = ("eval_results.json", "all_results.json", "confusion_matrix.png")

#: TrainingArguments that cannot change what a run computes (or that a resumed run may legitimately
#: change): they are not part of a run's identity.
RUN_NEUTRAL_ARGS = frozenset(
    {
        "output_dir",
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "disable_tqdm",
        "dataloader_num_workers",
        "dataloader_persistent_workers",
        "dataloader_pin_memory",
        "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context",
        "log_level",
        "log_level_replica",
        "log_on_each_node",
        "logging_dir",
        "logging_first_step",
        "logging_steps",
        "logging_strategy",
        "logging_nan_inf_filter",
        "report_to",
        "run_name",
        "project",
        "trackio_space_id",
        "trackio_bucket_id",
        "trackio_static_space_id",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_token",
        "hub_private_repo",
        "hub_always_push",
        "hub_revision",
        "save_total_limit",
        "save_on_each_node",
        "skip_memory_metrics",
        "local_rank",
        "ddp_timeout",
        "torch_empty_cache_steps",
    }
)


def _plain(value: Any) -> Any:
    """``value`` as it reads back from a JSON file (so a fresh record compares equal to a stored one)."""
    return json.loads(json.dumps(value, default=str))


def training_identity(args: Any) -> dict[str, Any]:
    """The training arguments that make a run what it is: ``args.to_dict()`` without
    :data:`RUN_NEUTRAL_ARGS`, as plain JSON values."""
    data = args.to_dict() if hasattr(args, "to_dict") else dict(vars(args))
    return _plain({k: v for k, v in sorted(data.items()) if k not in RUN_NEUTRAL_ARGS})


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if not prefix and key in RECORD_BOOKKEEPING:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key == "training":
            flat.update(_flatten(value, ""))
        else:
            flat[name] = value
    return flat


def run_differences(previous: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """What differs between two run records, as ``"key: old → new"`` strings, then what changed on disk in
    the folders both name (:func:`~deltatune.train.fingerprint.fingerprint_changes`); empty: the same run."""
    old, new = _flatten(_plain(previous)), _flatten(_plain(record))
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            show = [("(unset)" if v is missing else json.dumps(v)[:60]) for v in (a, b)]
            out.append(f"{key}: {show[0]} → {show[1]}")
    return out + fingerprint_changes(previous, record)


def same_run(previous: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether the run records ``previous`` and ``record`` describe the same run (every key equal, both ways;
    progress keys such as ``status`` aside)."""
    return not run_differences(previous, record)


def write_run_record(directory: str | os.PathLike[str], record: dict[str, Any], status: str) -> None:
    """Writes ``record`` with ``"status": status`` (``"running"`` or ``"finished"``) as the folder's run record."""
    write_json(os.path.join(directory, RUN_RECORD_NAME), {**record, "status": status})


def _listing(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(e for e in os.listdir(directory) if e != LOCK_NAME and not e.startswith(TMP_PREFIX))


def _evaluation_only(path: str) -> bool:
    """Whether the folder ``path`` holds only what ``deltatune evaluate`` writes (its temporaries included)."""
    return all(
        (e in EVALUATE_FILES or e.startswith(TMP_PREFIX)) and not os.path.isdir(os.path.join(path, e))
        for e in os.listdir(path)
    )


def _remove_run_files(directory: str, entries: list[str]) -> list[str]:
    """Removes what runs wrote into ``directory``; returns the entries left in place."""
    kept = []
    for entry in entries:
        path = os.path.join(directory, entry)
        is_dir = os.path.isdir(path) and not os.path.islink(path)
        if is_dir and (
            entry.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
            or os.path.isfile(os.path.join(path, RUN_RECORD_NAME))
            or (entry == EVALUATE_DIR and _evaluation_only(path))
        ):
            shutil.rmtree(path)
        elif not is_dir and (entry in OUTPUT_FILES or entry.endswith(OUTPUT_SUFFIXES)):
            os.remove(path)
        else:
            kept.append(entry)
    if kept:
        logger.info("left in %s (not written by deltatune): %s", directory, ", ".join(kept))
    return kept


def _checkpoint_dirs(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return [
        os.path.join(directory, e)
        for e in os.listdir(directory)
        if e.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and os.path.isdir(os.path.join(directory, e))
    ]


def _both_flags() -> str:
    return (
        "pass --resume_from_checkpoint true to continue the run it holds, --overwrite_output_dir to replace it, "
        "or choose another --output_dir"
    )


def _wants_resume(resume: Any) -> bool:
    return resume not in (None, "", False) and str(resume).lower() not in ("false", "no", "none")


def prepare_output_dir(
    directory: str,
    record: dict[str, Any],
    overwrite: bool,
    resume: Any,
    main_process: bool = True,
    upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> str | None:
    """Checks that ``directory`` can take the run ``record`` describes, cleans it when asked, and resolves
    ``resume`` (see the module docstring for the rules). Call it while holding the folder's
    :class:`~deltatune.train.lock.RunLock`.

    Args:
        directory: The output folder.
        record: The new run's record (compared with the folder's :data:`RUN_RECORD_NAME`).
        overwrite: ``--overwrite_output_dir``: remove what a previous run wrote instead of refusing.
        resume: ``--resume_from_checkpoint``: None/False, ``"true"`` (the newest complete checkpoint) or a path.
        main_process: False on the other processes of a torchrun/accelerate run: the folder is neither
            checked nor cleaned, only ``resume`` is resolved (process 0 has checked it first).
        upgrade: Rewrites a record an earlier version wrote into today's terms before it is compared (the
            caller knows what its records name: ``--method lora --use_dora`` was recorded as ``lora``).

    Returns:
        The checkpoint to resume from (None to start fresh).

    Raises:
        OutputDirError: for a folder that cannot take this run, or a contradictory request; nothing has been
            removed then.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputDirError(f"--output_dir {directory!r} is a file; pass a directory")
    wants_resume = _wants_resume(resume)
    if overwrite and wants_resume:
        raise OutputDirError(
            "--overwrite_output_dir removes the checkpoints that --resume_from_checkpoint would continue from; "
            "pass only one of them"
        )
    explicit = wants_resume and str(resume).lower() not in ("true", "last", "latest")
    if explicit:
        problem = checkpoint_problem(str(resume))
        if problem is not None:
            sibling = latest_complete_checkpoint(os.path.dirname(os.path.normpath(str(resume))) or ".")
            hint = f"; resume from {sibling!r} instead" if sibling else ""
            raise OutputDirError(f"--resume_from_checkpoint: cannot resume: {problem}{hint}")
    if not main_process:
        return _resolve(directory, resume) if wants_resume else None
    removed = remove_stale_temporaries(directory)
    for checkpoint in _checkpoint_dirs(directory):
        removed += remove_stale_temporaries(checkpoint)
    if removed:
        logger.info("removed %d temporary files a killed process left in %s", len(removed), directory)
    entries = _listing(directory)
    record_path = os.path.join(directory, RUN_RECORD_NAME)
    previous = read_json(record_path, "run record") if os.path.isfile(record_path) else None
    if previous is not None and not isinstance(previous, dict):
        previous = None
    if previous is not None and upgrade is not None:
        previous = upgrade(previous)
    if entries and previous is None:
        foreign = [e for e in entries if e != LOG_NAME]
        if foreign:
            raise OutputDirError(
                f"--output_dir {directory!r} holds files not written by deltatune ({', '.join(foreign[:4])}"
                f"{', ...' if len(foreign) > 4 else ''}); choose another --output_dir, or empty it"
            )
        _remove_run_files(directory, entries)  # the log of a run refused before it started: start clean
        entries = []
    if entries and previous is not None:
        if overwrite:
            _remove_run_files(directory, entries)
        else:
            differences = run_differences(previous, record)
            if "training" in record and "training" not in previous:
                raise OutputDirError(
                    f"--output_dir {directory!r} holds a run recorded by an earlier deltatune version, without its "
                    "training arguments, so it cannot be checked to be this run: pass --overwrite_output_dir to "
                    "replace it, or choose another --output_dir"
                )
            if differences and _stopped_before_saving(previous, entries):
                logger.info(
                    "--output_dir %s: replacing an unfinished run that saved nothing (%s)",
                    directory,
                    "; ".join(differences[:4]),
                )
                _remove_run_files(directory, entries)
                entries, differences = [], []
            if differences:
                listed = "; ".join(differences[:4]) + (
                    f"; and {len(differences) - 4} more" if len(differences) > 4 else ""
                )
                if differences == fingerprint_changes(previous, record):  # same settings, other files
                    raise OutputDirError(
                        f"--output_dir {directory!r} holds this run, but {listed}; it continues only on the files "
                        "it started with: restore them, pass --overwrite_output_dir to train it again from the "
                        "start, or choose another --output_dir"
                    )
                raise OutputDirError(
                    f"--output_dir {directory!r} already holds a different run ({listed}). "
                    "--resume_from_checkpoint continues only the same run: pass --overwrite_output_dir to replace "
                    "it, or choose another --output_dir"
                )
            if not wants_resume:
                last = latest_complete_checkpoint(directory)
                if previous.get("status") == "finished":
                    raise OutputDirError(
                        f"--output_dir {directory!r} already holds this run, finished; pass "
                        "--overwrite_output_dir to train it again, --resume_from_checkpoint true to continue from "
                        "its last checkpoint, or choose another --output_dir"
                    )
                if last is not None:
                    raise OutputDirError(
                        f"--output_dir {directory!r} holds this run, unfinished (last complete checkpoint: "
                        f"{os.path.basename(last)}); {_both_flags()}"
                    )
                _remove_run_files(directory, entries)  # nothing saved yet: start over, clean
    if not wants_resume:
        return None
    if explicit:
        inside = os.path.realpath(os.path.dirname(os.path.normpath(str(resume))))
        if inside != os.path.realpath(directory) and previous is None and not entries:
            _check_foreign_checkpoint(
                str(resume), inside, record, upgrade
            )  # a fresh folder: the same run only
            return str(resume)
        if inside != os.path.realpath(directory):
            raise OutputDirError(
                f"--resume_from_checkpoint {resume!r} is not a checkpoint of the run in --output_dir "
                f"{directory!r}; a run resumes only from its own checkpoints"
            )
        return str(resume)
    return _resolve(directory, resume)


def _stopped_before_saving(previous: dict[str, Any], entries: list[str]) -> bool:
    """A run that stopped before saving anything (only its record, status not finished, and its log): nothing
    to resume or keep, so another run may take the folder."""
    return previous.get("status") != "finished" and set(entries) <= {RUN_RECORD_NAME, LOG_NAME}


def _check_foreign_checkpoint(
    checkpoint: str,
    run_dir: str,
    record: dict[str, Any],
    upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None,
) -> None:
    """A checkpoint of another folder may start a fresh folder only when its run is this run (when its
    folder's run record says so; a checkpoint without one is the user's call)."""
    path = os.path.join(run_dir, RUN_RECORD_NAME)
    owner = read_json(path, "run record") if os.path.isfile(path) else None
    if not isinstance(owner, dict):
        return
    owner = owner if upgrade is None else upgrade(owner)
    differences = run_differences(owner, record)
    if differences:
        raise OutputDirError(
            f"--resume_from_checkpoint {checkpoint!r} belongs to a different run ({'; '.join(differences[:4])}); "
            "a run resumes only its own checkpoints"
        )


def _resolve(directory: str, resume: Any) -> str:
    if str(resume).lower() in ("true", "last", "latest"):
        last = latest_complete_checkpoint(directory)  # skips a checkpoint a kill left half-written
        if last is None:
            raise OutputDirError(
                f"--resume_from_checkpoint: no complete checkpoint-N folder in {directory!r} to resume from; "
                "run without --resume_from_checkpoint to start"
            )
        return last
    return str(resume)
