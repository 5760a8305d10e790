"""The flags users bring from transformers (issue 12, items 1-3 and 7): run_image_classification.py's
spellings, ``--do_train``/``--do_eval``, a help that starts with the recipe and its real defaults, one-line
errors, checks made before anything loads (``--report_to``, ``--top_k``, the model and dataset sources,
the Hub found unreachable once and quickly)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tiny import write_train_val_assets

import deltatune.cli.checks as checks
from deltatune.cli import main
from deltatune.cli.run_args import parse_run, run_spec
from deltatune.cli.run_parser import CommandError

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_train_val_assets(tmp_path_factory.mktemp("flags"))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps the Hub checks' process-wide switches (offline mode, the cached probe) inside one test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(checks, "_switched_offline", [])
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))
    checks._probe.cache_clear()
    yield
    checks._probe.cache_clear()


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("deltatune: error: ") and "usage:" not in err
    return lines[0]


# ---- item 1: run_image_classification.py's flags --------------------------------------------------
def test_example_script_spellings_are_aliases(assets: dict[str, str]) -> None:
    parsed = parse_run(
        "train",
        [
            "--model_name_or_path", assets["model"],
            "--dataset_name", assets["train"],
            "--image_column_name", "img",
            "--label_column_name", "fine_label",
            "--train_val_split", "0.2",
            "--ignore_mismatched_sizes", "false",
            "--output_dir", "unused",
        ],
    )  # fmt: skip
    spec = run_spec(parsed, "lora")
    assert (spec.model, spec.dataset) == (assets["model"], assets["train"])
    assert (spec.image_column, spec.label_column, spec.validation_split) == ("img", "fine_label", 0.2)
    assert spec.ignore_mismatched_sizes is False
    folders = parse_run(
        "train", ["--train_dir", assets["train"], "--validation_dir", assets["val"], "--output_dir", "unused"]
    )
    assert folders.recipe == "guide"  # a dataset was named, as with --dataset
    spec = run_spec(folders, "lora")
    assert (spec.dataset, spec.validation_dir) == (assets["train"], assets["val"])
    with pytest.raises(CommandError, match="either --dataset_name or --train_dir"):
        parse_run("train", ["--dataset_name", "food101", "--train_dir", assets["train"]])
    with pytest.raises(CommandError, match="--validation_dir needs the training images"):
        parse_run("train", ["--validation_dir", assets["val"]])


def test_do_train_and_do_eval_are_honoured() -> None:
    default = parse_run("train", ["--output_dir", "unused"]).training_args
    assert default.do_train and default.do_eval and str(default.eval_strategy.value) == "epoch"
    no_eval = parse_run("train", ["--do_eval", "false", "--output_dir", "unused"]).training_args
    assert no_eval.do_train and not no_eval.do_eval
    assert str(no_eval.eval_strategy.value) == "no" and no_eval.load_best_model_at_end is False
    eval_only = parse_run("train", ["--do_train", "false", "--output_dir", "unused"]).training_args
    assert not eval_only.do_train and eval_only.do_eval
    explicit = parse_run("train", ["--do_train", "--do_eval", "--output_dir", "unused"]).training_args
    assert explicit.do_train and explicit.do_eval
    with pytest.raises(CommandError, match="nothing to do"):
        parse_run("train", ["--do_train", "false", "--do_eval", "false"])


def test_ignore_mismatched_sizes_false_refuses_another_head(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--model", assets["model"], "--train_dir", assets["train"], "--use_cpu"]
    argv += ["--max_steps", "1", "--output_dir", str(tmp_path / "out"), "--ignore_mismatched_sizes", "false"]
    assert main(argv) == 2  # the saved tiny ViT has a 2-label head, the folder 3 classes
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("deltatune: error: ")
    assert "ignore_mismatched_sizes=False" in line and "3-class" in line and "classifier" in line


# ---- item 2: the help and mistyped choices --------------------------------------------------------
def test_help_starts_with_the_recipe_and_its_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    first_screen = "\n".join(lines[:45])
    for flag in ("--method", "--model, --model_name_or_path", "--dataset, --dataset_name", "--train_dir"):
        assert flag in first_screen, flag
    flat = " ".join(text.split())  # argparse wraps help text at the terminal width
    assert "epochs (offline: 12 · guide: 5)" in flat
    assert "training batch per device (offline: 32 · guide: 128)" in flat
    assert "batches per optimiser step (offline: 1 · guide: 4)" in flat
    assert "peak learning rate (default: 0.005)" in flat
    assert "(offline: deltatune/vit-glyphs-32 · guide: google/vit-base-patch16-224-in21k)" in flat
    assert (
        "Rank of the update B A, a positive integer. (recipe: 16)" in flat
    )  # the recipe's adapter defaults, not the config class's
    assert "--adam_beta1" not in text and "--help-all" in text  # transformers' long tail is behind --help-all
    assert len(lines) < 200
    with pytest.raises(SystemExit):
        main(["train", "--help-all"])
    full = capsys.readouterr().out
    assert "--adam_beta1" in full and "--init_r" in full
    assert full.index("--method") < full.index("transformers TrainingArguments") < full.index("--adam_beta1")


def test_help_shows_the_chosen_method_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--method", "adalora", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "adapter options of adalora" in flat and "--init_r" in flat and "sets target_r" in flat


def test_mistyped_choice_is_one_line_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--method", "lorra"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "invalid choice: 'lorra'; did you mean 'lora'?" in line and "adalora" in line
    assert main(["compare", "--eval_strategy", "epok"]) == 2
    assert "did you mean 'epoch'" in _one_line(capsys.readouterr().err)
    assert main(["train", "--model_name_or_pth", "x"]) == 2
    assert "did you mean --model_name_or_path" in _one_line(capsys.readouterr().err)


# ---- item 3: integrations and counts -------------------------------------------------------------
def test_report_to_without_its_package_fails_before_loading(
    assets: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import transformers.integrations.integration_utils as integrations

    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: [])
    base = ["train", "--model", assets["model"], "--train_dir", assets["train"]]
    for name, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        out = tmp_path / name
        assert main([*base, "--output_dir", str(out), "--report_to", name]) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"pip install {package}" in line and f"--report_to {name}" in line
        assert not out.exists()  # refused before anything was written or loaded
    assert main([*base, "--report_to", "tensorbord"]) == 2
    assert "did you mean 'tensorboard'" in _one_line(capsys.readouterr().err)
    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    checks.check_report_to(["tensorboard"])  # installed: accepted


def test_top_k_below_one_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.tasks.inference import predict_images

    with pytest.raises(SystemExit) as done:
        main(["predict", str(tmp_path), "--adapter", str(tmp_path), "--top_k", "0"])
    assert done.value.code == 2
    assert "--top_k: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="top_k must be at least 1, got 0"):
        predict_images(None, [], top_k=0)  # type: ignore[arg-type]


# ---- item 7: sources checked first, the Hub asked once ---------------------------------------------
@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--model", "./nope"], ["--model './nope'", "no such directory"]),
        (
            ["--model_name_or_path", "/no/such/model"],
            ["--model_name_or_path '/no/such/model'", "no such directory"],
        ),
        (["--model", "a/b/c"], ["--model 'a/b/c'", "no such directory"]),
        (["--model", "bad id!"], ["--model 'bad id!'", "not a valid hub id"]),
        (["--dataset", "./no-data"], ["--dataset './no-data'", "no such directory"]),
        (["--train_dir", "/no/such/folder"], ["--train_dir '/no/such/folder'", "no such directory"]),
    ],
)
def test_wrong_sources_fail_in_one_line(
    argv: list[str],
    fragments: list[str],
    assets: dict[str, str],
    tmp_path: Path,
    hub: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if not {"--model", "--model_name_or_path"} & set(argv):
        argv = ["--model", assets["model"], *argv]  # the model is checked first
    assert main(["train", *argv, "--output_dir", str(tmp_path / "out")]) == 2
    line = _one_line(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in line, line
    assert "HFValidationError" not in line and not (tmp_path / "out").exists()


def test_unreachable_hub_is_found_out_once_and_named(
    assets: dict[str, str], hub: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, float]] = []

    def unreachable(request: urllib.request.Request, timeout: float = 0.0) -> object:
        calls.append((request.full_url, timeout))
        raise urllib.error.URLError(TimeoutError("timed out"))

    monkeypatch.setattr(checks.urllib.request, "urlopen", unreachable)
    with pytest.raises(CommandError) as info:
        checks.check_model_source("nope/not-cached", "--model")
    message = str(info.value)
    assert message.startswith(
        "--model 'nope/not-cached': not a local directory, not in the Hugging Face cache"
    )
    assert "https://huggingface.co could not be reached: timed out (3 s timeout)" in message
    with pytest.raises(CommandError, match=r"--dataset 'nope/data'.*could not be reached"):
        checks.check_dataset_source("nope/data", "--dataset")
    assert calls == [("https://huggingface.co", checks.HUB_TIMEOUT_S)]  # asked once, with a short timeout
    checks.check_model_source(assets["model"])  # a local folder needs no Hub


@pytest.mark.slow
def test_model_is_named_before_the_default_dataset_offline(tmp_path: Path) -> None:
    """``--model nope`` alone (the guide recipe's food101 as data) names the model, at once, offline."""
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "deltatune", "train", "--model", "nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert "--model 'nope'" in line and "HF_HUB_OFFLINE is set" in line and "food101" not in line
    assert "Retrying" not in done.stderr


@pytest.mark.slow
def test_silent_hub_times_out_once(tmp_path: Path) -> None:
    """A Hub that accepts the connection and never answers costs one short request, not minutes of retries."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # connections are queued and never answered
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    env = {**os.environ, "PYTHONPATH": SRC, "HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(tmp_path)}
    env.pop("HF_HUB_OFFLINE", None)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "deltatune", "train", "--model", "acme/vit", "--dataset", "acme/pets"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.close()
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert f"--model 'acme/vit': not a local directory, not in the Hugging Face cache ({tmp_path})" in line
    assert f"{endpoint} could not be reached: timed out (3 s timeout)" in line
    assert "Retrying" not in done.stderr


# ---- issue 16 item 7: offline with your own folder ------------------------------------------------
def test_unreachable_default_model_names_the_bundled_backbone(
    hub: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CommandError) as info:
        checks.check_model_source("nope/not-cached", None)  # the recipe's default: no --model given
    message = str(info.value)
    assert message.startswith("the default model 'nope/not-cached' (no --model given): not a local directory")
    assert "offline, pass the bundled backbone (--model deltatune/vit-glyphs-32)" in message
    assert "\n" not in message
    with pytest.raises(
        CommandError, match=r"^--model_name_or_path 'nope/x': .*--model deltatune/vit-glyphs-32"
    ):
        checks.check_model_source("nope/x", "--model_name_or_path")


@pytest.mark.slow
def test_own_folder_offline_without_model_names_the_bundled_backbone(
    assets: dict[str, str], tmp_path: Path
) -> None:
    """``deltatune train --dataset DIR`` with no --model and no network: one line naming the guide's model
    and the bundled backbone, at once (HF_HUB_OFFLINE: no request, no retry)."""
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "deltatune", "train", "--dataset", assets["train"]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert "the default model 'google/vit-base-patch16-224-in21k' (no --model given)" in line
    assert "--model deltatune/vit-glyphs-32" in line and "HF_HUB_OFFLINE is set" in line
    assert "Retrying" not in done.stderr and not list(tmp_path.glob("*-lora"))
