"""The numeric training options and the contradictory flag pairs of ``deltatune train``/``compare`` are
refused when the command line is parsed (one line naming the flag, the value and the valid range, exit 2),
before the output folder is touched; nothing here trains."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import write_train_val_assets

from deltatune.cli import main
from deltatune.cli.run_args import parse_run
from deltatune.cli.run_parser import CommandError


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("deltatune: error: ") and "usage:" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--learning_rate", "-1"], "--learning_rate -1: must be a finite number > 0"),
        (["--learning_rate", "nan"], "--learning_rate nan: must be a finite number > 0"),
        (["--learning_rate", "inf"], "--learning_rate inf: must be a finite number > 0"),
        (["--learning_rate", "0"], "--learning_rate 0: must be a finite number > 0"),
        (
            ["--per_device_eval_batch_size", "0"],
            "--per_device_eval_batch_size 0: must be a whole number of at least 1",
        ),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be a whole number"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be a whole number"),
        (["--max_grad_norm", "nan"], "--max_grad_norm nan: must be a finite number >= 0"),
        (["--weight_decay", "-0.1"], "--weight_decay -0.1: must be a finite number >= 0"),
        (["--warmup_steps", "-2"], "--warmup_steps -2: must be a finite number >= 0"),
        (["--num_train_epochs", "nan"], "--num_train_epochs nan: must be a finite number"),
        (["--adam_beta2", "1"], "--adam_beta2 1: must be a number from 0 up to"),
        (
            ["--logging_strategy", "steps", "--logging_steps", "0"],
            "--logging_steps 0: must be a finite number > 0",
        ),
    ],
)
def test_numeric_training_options_out_of_range_are_refused_when_parsed(
    flags: list[str], message: str
) -> None:
    with pytest.raises(CommandError) as info:
        parse_run("train", [*flags, "--output_dir", "unused"])
    assert str(info.value).startswith(message), info.value


def test_accepted_edges_and_both_recipes_defaults() -> None:
    parse_run("train", ["--output_dir", "unused"])
    parse_run("train", ["--model", "m", "--dataset", "d", "--output_dir", "unused"])  # the guide recipe
    parse_run("compare", ["--output_dir", "unused"])
    edges = parse_run(
        "train",
        ["--max_grad_norm", "0", "--weight_decay", "0", "--warmup_steps", "0.1", "--output_dir", "unused"],
    ).training_args
    assert (edges.max_grad_norm, edges.weight_decay) == (0.0, 0.0)
    with pytest.raises(CommandError, match=r"^--full_learning_rate -3: must be a finite number > 0"):
        parse_run("compare", ["--full_learning_rate", "-3", "--output_dir", "unused"])


def test_a_refused_value_exits_2_in_one_line_and_leaves_no_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bad"
    assert main(["train", "--learning_rate", "-1", "--output_dir", str(out)]) == 2
    assert "--learning_rate -1: must be a finite number > 0" in _one_line(capsys.readouterr().err)
    assert main(["train", "--per_device_train_batch_size", "0", "--output_dir", str(out)]) == 2
    assert "--per_device_train_batch_size 0" in _one_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "start"),
    [
        (["--num_train_epochs", "0"], "--num_train_epochs 0 trains nothing"),
        (["--num_train_epochs", "-1"], "--num_train_epochs -1 trains nothing"),
        (
            ["--max_steps", "-5", "--num_train_epochs", "0"],
            "--max_steps -5 with --num_train_epochs 0 trains nothing",
        ),
    ],
)
def test_a_run_of_no_length_is_refused_when_parsed(flags: list[str], start: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_run("train", [*flags, "--output_dir", "unused"])
    assert str(info.value).startswith(start) and "--do_train false" in str(info.value)


def test_a_run_with_a_length_or_without_training_is_accepted() -> None:
    assert (
        parse_run(
            "train", ["--max_steps", "3", "--num_train_epochs", "0", "--output_dir", "u"]
        ).training_args.max_steps
        == 3
    )
    evaluate_only = parse_run(
        "train", ["--num_train_epochs", "0", "--do_train", "false", "--output_dir", "u"]
    )
    assert evaluate_only.training_args.do_train is False


@pytest.mark.parametrize(
    "flags", [["--save_strategy", "no"], ["--eval_strategy", "no"], ["--save_strategy", "steps"]]
)
def test_the_recipes_load_best_model_gives_way_to_the_users_strategies(
    flags: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="deltatune"):
        args = parse_run("train", [*flags, "--output_dir", "unused"]).training_args
    assert args.load_best_model_at_end is False
    assert (
        f"{flags[0]} {flags[1]}: load_best_model_at_end (the recipe's default) is turned off" in caplog.text
    )


def test_an_explicit_load_best_model_with_strategies_it_cannot_use_names_both_flags() -> None:
    with pytest.raises(CommandError) as info:
        parse_run("train", ["--save_strategy", "no", "--load_best_model_at_end", "--output_dir", "unused"])
    assert str(info.value).startswith(
        "--load_best_model_at_end needs a checkpoint saved at every evaluation, but --save_strategy no"
    )
    assert parse_run(
        "train", ["--save_strategy", "best", "--output_dir", "u"]
    ).training_args.load_best_model_at_end


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_train_val_assets(tmp_path_factory.mktemp("values"))


@pytest.mark.parametrize("data_flag", ["--dataset", "--train_dir", "--validation_dir"])
def test_an_output_dir_inside_an_image_folder_is_refused(
    data_flag: str, assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = assets["val"] if data_flag == "--validation_dir" else assets["train"]
    link = tmp_path / "link"
    link.symlink_to(folder)  # a symlink to the folder is the folder
    data = ["--train_dir", assets["train"], "--validation_dir", assets["val"]]
    if data_flag == "--dataset":
        data = ["--dataset", assets["train"]]
    argv = ["train", "--model", assets["model"], *data, "--output_dir", str(link / "out1")]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"is inside {data_flag} " in line and str(Path(folder).resolve()) in line, line
    assert not (Path(folder) / "out1").exists()


@pytest.mark.parametrize(
    ("flags", "start"),
    [
        (
            ["--model", "a", "--model_name_or_path", "b"],
            "--model a and --model_name_or_path b name the same option",
        ),
        (["--dataset", "a", "--dataset_name", "b"], "--dataset a and --dataset_name b name the same option"),
        (["--r", "2", "--rank", "8"], "--r 2 and --rank 8 name the same option"),
        (["--lora_alpha", "8", "--alpha", "32"], "--alpha 32.0 and --lora_alpha 8.0 name the same option"),
    ],
)
def test_two_spellings_of_one_option_with_different_values_are_refused(flags: list[str], start: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_run("train", [*flags, "--output_dir", "unused"])
    assert str(info.value).startswith(start), info.value
    parse_run(
        "train", [*flags[:2], flags[2], flags[1], "--output_dir", "unused"]
    )  # the same value twice is fine


def test_two_spellings_compare_as_the_option_reads_them(capsys: pytest.CaptureFixture[str]) -> None:
    """``--r 2 --rank 02`` is one value; ``--rank 2.0`` is argparse's invalid int, not "different values"."""
    parsed = parse_run("train", ["--r", "2", "--rank", "02", "--output_dir", "unused"])
    assert parsed.options.r == 2
    with pytest.raises(CommandError) as info:
        parse_run("train", ["--r", "2", "--rank", "2.0", "--output_dir", "unused"])
    assert "invalid int value: '2.0'" in str(info.value) and "same option" not in str(info.value), info.value


def test_validation_split_with_validation_dir_is_refused(assets: dict[str, str]) -> None:
    with pytest.raises(CommandError, match=r"^--validation_split is unused with --validation_dir"):
        parse_run(
            "train",
            ["--train_dir", assets["train"], "--validation_dir", assets["val"], "--validation_split", "0.5"],
        )


def test_a_run_that_stopped_before_saving_anything_does_not_block_another(tmp_path: Path) -> None:
    from deltatune.train.outputs import OutputDirError, prepare_output_dir, write_run_record

    out = tmp_path / "run"
    out.mkdir()
    write_run_record(out, {"kind": "train", "training": {"learning_rate": 5.0}}, "running")
    (out / "train.log").write_text("the run stopped: ValueError\n")
    assert (
        prepare_output_dir(str(out), {"kind": "train", "training": {"learning_rate": 0.001}}, False, None)
        is None
    )
    assert list(out.iterdir()) == []
    write_run_record(out, {"kind": "train", "training": {"learning_rate": 5.0}}, "running")
    (out / "checkpoint-1").mkdir()  # it saved something: still refused
    with pytest.raises(OutputDirError, match="different run"):
        prepare_output_dir(str(out), {"kind": "train", "training": {"learning_rate": 0.001}}, False, None)
