"""A resumed run's files describe the whole run (u-cli's U1): after Ctrl-C while a finished training writes its
outputs, the documented resume rewrites them with the run's training time (summed over the sessions, as the
checkpoint's trainer state records it), a non-zero throughput, the earlier session's peak memory, and the final
evaluation's per-class accuracy, confusion matrix and mistakes (recomputed, not dropped); a resume from a
mid-run checkpoint reports the time of both sessions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from tiny import save_tiny_vit_dir, write_image_folder

import deltatune.tasks.image_classification as recipe
from deltatune.cli import main
from deltatune.train.lock import RunLock
from deltatune.train.trainer import DeltaTrainer

FLAGS = [
    "--num_train_epochs", "3", "--per_device_train_batch_size", "4", "--use_cpu", "--disable_tqdm", "true",
    "--seed", "0", "--validation_split", "0.25", "--method", "lora", "--r", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("resume-outputs")
    save_tiny_vit_dir(root / "model")
    write_image_folder(root / "data", per_class=6)
    return {"model": str(root / "model"), "data": str(root / "data")}


def argv(assets: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        assets["model"],
        "--dataset",
        assets["data"],
        "--output_dir",
        str(out),
        *FLAGS,
        *extra,
    ]


def totals(checkpoint: Path) -> dict[str, Any]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return dict(state["stateful_callbacks"]["DeltaTrainerRunLoss"]["attributes"])


def test_ctrl_c_while_the_outputs_are_written_then_resume_keeps_the_runs_numbers_and_results(
    assets: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    original = recipe.save_trained

    def save_then_interrupt(*args: Any) -> None:
        original(*args)
        raise KeyboardInterrupt  # Ctrl-C once the final adapter is saved, before the results are written

    with monkeypatch.context() as patch:
        patch.setattr(recipe, "save_trained", save_then_interrupt)
        assert main(argv(assets, out)) == 130
    recorded = totals(out / "checkpoint-3")
    assert recorded["train_runtime"] > 0 and recorded["peak_memory_mb"] is not None
    assert main(argv(assets, out, "--resume_from_checkpoint", "true")) == 0
    assert totals(out / "checkpoint-3") == recorded and not (out / "checkpoint-4").exists(), "trained nothing"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_time_s"] >= recorded["train_runtime"], "the run's time, not this session's"
    assert metrics["train"]["train_samples_per_second"] > 0 and metrics["train"]["train_steps_per_second"] > 0
    assert metrics["peak_memory_mb"] == recorded["peak_memory_mb"], "the session that trained is the measure"
    for name in ("train_results.json", "all_results.json"):
        assert json.loads((out / name).read_text())["train_runtime"] == metrics["train_time_s"]
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert (
        sum(map(sum, evaluation["confusion_matrix"])) == evaluation["eval_samples"] == metrics["num_eval"] > 0
    )
    assert set(evaluation["per_class_accuracy"]) == {"bright", "dark", "red"}
    assert metrics["confusion_matrix"] == evaluation["confusion_matrix"]
    report = (out / "report.html").read_text()
    assert "Confusion matrix" in report and "no evaluation" not in report
    assert (out / "confusion_matrix.png").is_file()
    assert f"fp32, {metrics['train_time_s']:.1f} s" in (out / "README.md").read_text()


def test_a_resume_from_a_mid_run_checkpoint_reports_the_time_of_both_sessions(
    assets: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    original = DeltaTrainer._save_checkpoint

    def save_then_interrupt(self: DeltaTrainer, model: Any, trial: Any) -> None:
        original(self, model, trial)
        raise KeyboardInterrupt  # Ctrl-C right after checkpoint-1 is complete

    with monkeypatch.context() as patch:
        patch.setattr(DeltaTrainer, "_save_checkpoint", save_then_interrupt)
        assert main(argv(assets, out)) == 130
    first = totals(out / "checkpoint-1")["train_runtime"]
    assert main(argv(assets, out, "--resume_from_checkpoint", "true")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    last = totals(out / "checkpoint-3")
    assert last["train_runtime"] > first, "each checkpoint records the time of every session so far"
    assert metrics["train_time_s"] > first and metrics["train"]["train_runtime"] == metrics["train_time_s"]
    final_log = [e for e in metrics["history"] if "train_runtime" in e][-1]
    assert final_log["train_runtime"] == metrics["train_time_s"], "trainer_state.json's log says the same"
    assert metrics["peak_memory_mb"] >= last["peak_memory_mb"] > 0
    assert "confusion_matrix" in json.loads((out / "eval_results.json").read_text())


def test_predict_evaluate_and_merge_on_a_run_still_training_or_stopped_say_so(
    assets: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """u-cli's U2: the output folder of a run that has not saved its adapter is not "not an output folder"."""
    out = tmp_path / "out"
    original = DeltaTrainer._save_checkpoint

    def save_then_interrupt(self: DeltaTrainer, model: Any, trial: Any) -> None:
        original(self, model, trial)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(DeltaTrainer, "_save_checkpoint", save_then_interrupt)
        assert main([*argv(assets, out), "--num_train_epochs", "2"]) == 130
    capsys.readouterr()
    image = str(next(Path(assets["data"]).rglob("*.png")))
    checkpoint = str(out / "checkpoint-1")
    assert main(["predict", image, "--adapter", str(out)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(
        f"deltatune: error: --adapter '{out}' holds a run that stopped before saving its adapter"
    )
    assert "--resume_from_checkpoint true" in line and f"--adapter '{checkpoint}'" in line
    assert main(["predict", image, "--adapter", checkpoint]) == 0, "the checkpoint it names works"
    capsys.readouterr()
    with RunLock(out):  # the lock a live run holds, naming this process
        for command in (
            ["predict", image, "--adapter", str(out)],
            ["evaluate", "--adapter", str(out), "--output_dir", str(tmp_path / "ev")],
            ["merge", "--adapter", str(out), "--output", str(tmp_path / "merged")],
        ):
            assert main(command) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert f"--adapter '{out}' is a run still being trained (pid {os.getpid()}" in err, err
            assert f"wait for it or pass --adapter '{checkpoint}' for its newest checkpoint" in err
