"""The u-cli tester's U5-U10 and U12 (/work/wt/_notes/u-cli-findings.md): the cards' model-index (one truth with
metrics.json), YAML-1.2-safe repo ids, an exact resume command, read-only result folders refused before the
work, one evaluation per results folder at a time, ``--version`` and the commands' unknown-flag help,
``quickstart --num_labels`` range."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import ModelCard
from tiny import write_train_val_assets

from deltatune.cli import main
from deltatune.cli.errors import shell_quote
from deltatune.model_card import render_card
from deltatune.tasks.cards import merged_model_card, model_card

FAST = ["--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--use_cpu", "--seed", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny train run (its folder)."""
    root = tmp_path_factory.mktemp("seams2")
    assets = write_train_val_assets(root)
    out = root / "run"
    argv = ["train", "--model", assets["model"], "--train_dir", assets["train"]]
    assert main([*argv, "--validation_dir", assets["val"], "--output_dir", str(out), *FAST]) == 0
    return out


def _metrics_by_type(card: ModelCard) -> dict[str, Any]:
    return {result.metric_type: result.metric_value for result in card.data.eval_results or []}


# ---- U8: the evaluation in the card's metadata (model-index) --------------------------------------
def test_run_card_model_index_is_the_runs_metrics_json(run: Path) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    card = ModelCard.load(run / "README.md")
    assert card.data.model_name
    assert _metrics_by_type(card) == {"accuracy": metrics["accuracy"]}  # top-5 is None for 3 classes
    (result,) = card.data.eval_results
    assert (result.task_type, result.dataset_type) == ("image-classification", "imagefolder")
    assert result.dataset_name.startswith(Path(metrics["dataset"]).name)


def test_card_model_index_carries_unrounded_accuracy_top5_and_hub_dataset(run: Path) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.update(accuracy=0.8333333333333334, top5_accuracy=0.9166666666666666, dataset="food101")
    card = ModelCard(model_card(metrics))
    assert _metrics_by_type(card) == {"accuracy": 0.8333333333333334, "top_5_accuracy": 0.9166666666666666}
    assert card.data.datasets == ["food101"]
    assert {r.dataset_type for r in card.data.eval_results} == {"food101"}
    hostile = ModelCard(
        model_card({**metrics, "dataset": "d\nlicense: evil #: 1e3", "base_model": "m\nx: y"})
    )
    assert "license" not in hostile.data.to_dict() and "x" not in hostile.data.to_dict()
    assert _metrics_by_type(hostile)["accuracy"] == 0.8333333333333334


def test_merged_card_model_index_only_when_merged_into_the_recorded_base() -> None:
    info = {"base_model": "acme/vit", "method": "LoRA", "accuracy": 0.75, "dataset": "food101"}
    assert _metrics_by_type(ModelCard(merged_model_card(info))) == {"accuracy": 0.75}
    other = ModelCard(merged_model_card({**info, "trained_on": "acme/other"}))
    assert other.data.eval_results is None


# ---- U10: repo ids that YAML 1.2 reads as numbers are quoted ----------------------------------------
@pytest.mark.parametrize("name", ["1e3", "0o17", "0x1F", "12", "-1.5", ".inf", "true", "null", "yes"])
def test_repo_ids_that_read_as_other_types_are_quoted(name: str) -> None:
    text = render_card({"library_name": "peft", "base_model": name}, "# card\n")
    front = text.split("---\n")[1]
    assert f"base_model: '{name}'\n" in front  # quoted: a string under YAML 1.1 and 1.2
    assert yaml.safe_load(front)["base_model"] == name
    assert ModelCard(text).data.base_model == name


def test_ordinary_repo_ids_stay_plain() -> None:
    text = render_card({"library_name": "peft", "base_model": "acme/tiny-vit"}, "# card\n")
    assert "base_model: acme/tiny-vit\n" in text


# ---- U9: the printed resume command is exact ---------------------------------------------------------
def test_interrupt_prints_a_resume_command_that_reads_back_as_the_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from deltatune.train.trainer import DeltaTrainer

    assets = write_train_val_assets(tmp_path)
    save = DeltaTrainer._save_checkpoint

    def save_then_ctrl_c(self: Any, *args: Any, **kwargs: Any) -> Any:
        save(self, *args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C right after the first checkpoint is complete

    monkeypatch.setattr(DeltaTrainer, "_save_checkpoint", save_then_ctrl_c)
    monkeypatch.chdir(tmp_path)
    argv = [
        "train",
        "--model",
        assets["model"],
        "--train_dir",
        assets["train"],
        "--output_dir",
        "two  spaces",
    ]
    argv += [*FAST, "--num_train_epochs", "2", "--save_strategy", "epoch"]
    capsys.readouterr()
    assert main(argv) == 130
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "resume with: " in x]
    printed = shlex.split(line.split("resume with: ", 1)[1])
    assert printed == ["deltatune", *argv, "--resume_from_checkpoint", "true"]
    assert "two  spaces/checkpoint-" in line


@pytest.mark.parametrize("name", ["two  spaces", "tab\there", "new\nline", "quote ' and $HOME", "bell\x07"])
def test_shell_quote_round_trips_through_bash(name: str) -> None:
    words = [name, "--output_dir", name, "plain"]
    command = " ".join(shell_quote(word) for word in words)
    assert command.isprintable()  # one line on the terminal
    done = subprocess.run(["bash", "-c", f"printf '%s\\0' {command}"], capture_output=True, check=True)
    assert done.stdout.decode().split("\0")[:-1] == words


# ---- U7: an unwritable results/output folder is refused before the work ----------------------------
def test_unwritable_evaluate_and_merge_outputs_are_refused_before_loading(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from deltatune.cli import commands

    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the adapter was loaded before the output folder was checked")

    monkeypatch.setattr(commands, "_load", no_work)
    blocker = tmp_path / "a-file"  # a file where a folder should be: no folder can be written under it
    blocker.write_text("x")
    capsys.readouterr()
    assert main(["evaluate", "--adapter", str(run), "--output_dir", str(blocker / "ev")]) != 0
    assert main(["merge", "--adapter", str(run), "--output", str(blocker / "m")]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert f"--output_dir {blocker / 'ev'}" in lines[0]
    assert f"--output {blocker / 'm'}" in lines[1] and ".tmp-" not in lines[1]


# ---- U12: one evaluation per results folder at a time ----------------------------------------------
_HOLD_EVALUATION = """
import sys
from deltatune.cli import main
from deltatune.tasks import inference
original = inference.evaluate_adapter
def held(*args, **kwargs):
    print("SCORING", flush=True)  # the state the test waits for
    sys.stdin.readline()
    return original(*args, **kwargs)
inference.evaluate_adapter = held
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_evaluation_into_the_same_folder_is_refused_while_the_first_runs(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import sys

    out = tmp_path / "ev"
    first = ["evaluate", "--adapter", str(run), "--output_dir", str(out), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_EVALUATION, *first],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        for line in proc.stdout:  # wait for the state: A is evaluating, its folder locked
            if line.startswith("SCORING"):
                break
        capsys.readouterr()
        second = ["evaluate", "--adapter", str(run), "--output_dir", str(out), "--overwrite"]
        assert main([*second, "--max_eval_samples", "1"]) != 0
        refusal = capsys.readouterr().err
        assert "in use by another deltatune run" in refusal and f"pid {proc.pid}" in refusal
        assert not (out / "eval_results.json").exists()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["eval_samples"] == json.loads((run / "eval_results.json").read_text())["eval_samples"]
    assert (out / "confusion_matrix.png").is_file()


# ---- U5: --version; the simple commands' unknown options; --help-all ---------------------------------
@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flag_prints_the_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune import __version__

    with pytest.raises(SystemExit) as done:
        main([flag])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"deltatune {__version__}"


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        (["evaluate", "--adapter", "a", "--overwite"], "--overwrite"),
        (["merge", "--adapter", "a", "--output", "m", "--overwrit"], "--overwrite"),
        (["predict", "x.png", "--adapter", "a", "--jsn"], "--json"),
    ],
)
def test_unknown_options_of_simple_commands_suggest_and_point_at_their_help(
    argv: list[str], meant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"did you mean {meant}?" in line and f"see `deltatune {argv[0]} --help`" in line


@pytest.mark.parametrize("command", ["predict", "evaluate", "merge", "quickstart"])
def test_help_all_is_help_for_commands_without_a_longer_one(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help-all"])
    assert done.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"usage: deltatune {command}") and "required" not in captured.err


# ---- U6: quickstart --num_labels range ------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-3"])
def test_quickstart_refuses_a_headless_num_labels(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["quickstart", "--num_labels", value])
    assert done.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--num_labels" in line and "at least 1" in line
