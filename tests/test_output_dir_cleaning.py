"""What `train` removes from a folder that holds an earlier run (`--overwrite_output_dir`, or the same run
restarted with nothing saved): everything deltatune wrote for the old adapter, the results `deltatune evaluate`
wrote beside it in `<run>/evaluate/` included, and nothing of the user's."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from deltatune.tasks.evaluation import results_folder, write_evaluation
from deltatune.train.outputs import RUN_RECORD_NAME, prepare_output_dir

RECORD = {"method": "lora", "training": {"learning_rate": 0.1, "seed": 0}}


def old_run(folder: Path, status: str = "finished", learning_rate: float = 0.2) -> Path:
    """A folder as a finished run and a later `deltatune evaluate` of its adapter leave it."""
    folder.mkdir()
    record = {**RECORD, "training": {**RECORD["training"], "learning_rate": learning_rate}, "status": status}
    (folder / RUN_RECORD_NAME).write_text(json.dumps(record))
    (folder / "adapter_model.safetensors").write_bytes(b"old")
    (folder / "eval_results.json").write_text("{}")  # the run's own results: evaluate goes to evaluate/
    out = results_folder(str(folder), None, overwrite=False)
    assert out == str(folder / "evaluate")
    write_evaluation(out, {"eval_accuracy": 0.5}, str(folder))
    (folder / "evaluate" / "confusion_matrix.png").write_bytes(b"old")
    return folder


def test_overwrite_removes_the_old_adapters_evaluation(tmp_path: Path) -> None:
    run = old_run(tmp_path / "run")
    assert prepare_output_dir(str(run), RECORD, overwrite=True, resume=None) is None
    assert os.listdir(run) == [], "the old adapter's evaluate/ results stay beside the new adapter"


def test_a_restarted_run_with_nothing_saved_removes_it_too(tmp_path: Path) -> None:
    run = old_run(tmp_path / "run", status="running", learning_rate=0.1)  # the same run, no checkpoint
    assert prepare_output_dir(str(run), RECORD, overwrite=False, resume=None) is None
    assert os.listdir(run) == []


def test_an_evaluate_folder_holding_the_users_files_stays_and_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = old_run(tmp_path / "run")
    (run / "evaluate" / "notes.txt").write_text("mine")
    with caplog.at_level(logging.INFO, logger="deltatune.train.outputs"):
        prepare_output_dir(str(run), RECORD, overwrite=True, resume=None)
    assert os.listdir(run) == ["evaluate"]
    assert sorted(os.listdir(run / "evaluate")) == [
        "all_results.json",
        "confusion_matrix.png",
        "eval_results.json",
        "notes.txt",
    ]
    assert any(
        "not written by deltatune" in r.getMessage() and "evaluate" in r.getMessage() for r in caplog.records
    )
