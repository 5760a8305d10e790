"""The console (issue 12, item 6): one line per epoch instead of raw loss dicts, plain unwrapped text when
piped, warnings shown once with a count, the full log in ``train.log``, ``compare`` without the warm-up's
output, and no untrue "new head" line when a trained adapter is loaded."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_tiny_vit_dir, write_image_folder

from deltatune.cli import main
from deltatune.cli.output import EpochReporter, WarningDigest

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST = [
    "--per_device_train_batch_size",
    "8",
    "--gradient_accumulation_steps",
    "1",
    "--use_cpu",
    "--seed",
    "0",
]
ROW = re.compile(r"^\s+(\d+)/(\d+)\s+\d+\.\d{4}\s+\d+\.\d{4}\s+\d\.\d{4}\s+-\s+\d+\s+\d+:\d\d\s+\d+:\d\d$")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("console")
    save_tiny_vit_dir(root / "model")
    write_image_folder(root / "data", per_class=6, seed=0)
    return {"root": str(root), "model": str(root / "model"), "data": str(root / "data")}


@pytest.mark.slow
def test_piped_train_prints_plain_lines_one_per_epoch(assets: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / ("a-folder-name-long-enough-that-an-eighty-column-console-would-wrap-it" * 2) / "run"
    argv = ["train", "--model", assets["model"], "--dataset", assets["data"], "--output_dir", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "deltatune", *argv, *FAST, "--num_train_epochs", "3", "--logging_steps", "1"],
        env={**os.environ, "PYTHONPATH": SRC, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stdout, stderr = done.stdout, done.stderr
    assert "\x1b[" not in stdout + stderr  # no colours or cursor moves in a pipe
    lines = stdout.splitlines()
    assert lines[0].startswith("deltatune train lora · model ") and lines[0].endswith(f"output {out}")
    assert lines[1].split() == [
        "epoch",
        "loss",
        "eval",
        "loss",
        "accuracy",
        "top-5",
        "images/s",
        "elapsed",
        "ETA",
    ]
    rows = [ROW.match(line) for line in lines]
    assert [(m.group(1), m.group(2)) for m in rows if m] == [("1", "3"), ("2", "3"), ("3", "3")], stdout
    wrote = next(line for line in lines if line.startswith("wrote "))
    assert (
        wrote.startswith(f"wrote {out}/: README.md, ")
        and "train.log" in wrote
        and "trainer_state.json" in wrote
    )
    assert (
        lines[-1]
        == f"open {out}/report.html in a browser for the curves, the confusion matrix and the mistakes"
    )
    assert "{'loss'" not in stdout + stderr and "'eval_loss'" not in stdout + stderr  # no raw log dicts
    assert "it/s]" not in stderr and "Loading weights" not in stderr  # no tqdm bars
    assert all(line.startswith("[deltatune] ") for line in stderr.splitlines()), stderr
    log = (out / "train.log").read_text()
    steps = int(re.findall(r"step (\d+): ", log)[-1])
    assert log.count('"loss": ') == steps and log.count('"eval_loss": ') == 3  # every step, every evaluation
    for row in (m.group(0) for m in rows if m):
        assert row in log
    assert "saving adapter to" in log  # debug lines go to the log, not the console
    assert "saving adapter to" not in stderr


def test_skipped_images_warn_once_with_a_count(
    assets: dict[str, str], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    write_image_folder(data, per_class=6, seed=0)
    for name in ("bright/broken.png", "red/broken.png"):
        (data / name).write_bytes(b"not a png at all")
    out = tmp_path / "run"
    argv = ["train", "--model", assets["model"], "--dataset", str(data), "--output_dir", str(out)]
    assert main([*argv, *FAST, "--num_train_epochs", "3", "--validation_split", "0.1"]) == 0
    err = capfd.readouterr().err
    shown = [line for line in err.splitlines() if "skipped unreadable image" in line]
    assert len(shown) == 2, err  # the first one, and the count at the end
    assert shown[0].startswith("[deltatune] warning: skipped unreadable image")
    count = int(re.search(r"shown once above, (\d+) times in all", shown[1]).group(1))  # type: ignore[union-attr]
    assert count >= 6  # two files, three epochs
    assert "fetch.py" not in err and "warnings.warn" not in err  # no source line of torch's
    assert (out / "train.log").read_text().count("RuntimeWarning: skipped unreadable image") == count


def test_warning_digest_counts_warnings_that_differ_only_in_numbers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    digest = WarningDigest()
    for i in range(5):
        digest.show(f"skipped image {i} ({i + 1} so far)", RuntimeWarning, "x.py", 1)
    digest.show("another warning", UserWarning, "y.py", 2)
    assert capsys.readouterr().err.splitlines() == [
        "[deltatune] warning: skipped image 0 (1 so far)",
        "[deltatune] warning: another warning",
    ]
    assert digest.summary() == ["warning shown once above, 5 times in all: skipped image 0 (1 so far)"]


def test_epoch_rows_without_evaluation_still_come_once_per_epoch(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "train",
        "--model",
        assets["model"],
        "--dataset",
        assets["data"],
        "--output_dir",
        str(tmp_path / "r"),
    ]
    assert main([*argv, *FAST, "--num_train_epochs", "2", "--do_eval", "false", "--logging_steps", "50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if re.match(r"^\s+\d+/2\s", line)]
    assert [r[0] for r in rows] == ["1/2", "2/2"]
    assert all(r[1] != "-" and r[2:5] == ["-", "-", "-"] for r in rows)  # the loss is known, no evaluation
    assert EpochReporter.HEADER in lines


def test_the_epoch_column_is_the_trainers_epoch_where_max_steps_ends_inside_an_epoch(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last row said ``round(epoch)``: at 1.4 epochs the previous row's ``1`` again (at 1.6, a ``2`` no
    epoch had reached)."""
    import json

    out = tmp_path / "r"
    argv = ["train", "--model", assets["model"], "--dataset", assets["data"], "--output_dir", str(out)]
    assert main([*argv, *FAST, "--max_steps", "7", "--per_device_train_batch_size", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [
        line.split()[0]
        for line in lines[lines.index(EpochReporter.HEADER) + 1 :]
        if re.match(r"^\s+\d", line)
    ]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    ends = sorted({float(h["epoch"]) for h in history if "eval_loss" in h})
    assert ends[-1] % 1 != 0, "the run must stop inside an epoch"
    assert rows == [f"{e:g}" for e in ends], (rows, ends)


def test_loading_a_trained_adapter_announces_no_new_head(
    assets: dict[str, str], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "adapter"
    argv = ["train", "--model", assets["model"], "--dataset", assets["data"], "--output_dir", str(run)]
    assert main([*argv, *FAST, "--max_steps", "2"]) == 0
    assert "new 3-class head" in capfd.readouterr().err  # training does start a new head
    image = next(Path(assets["data"], "red").iterdir())
    for command in (
        ["evaluate", "--adapter", str(run)],
        ["predict", str(image), "--adapter", str(run)],
        ["merge", "--adapter", str(run), "--output", str(tmp_path / "merged")],
    ):
        assert main(command) == 0, command
        err = capfd.readouterr().err
        assert "head" not in err and "initialised" not in err, (command, err)


def test_train_log_drops_only_os_errors_of_its_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed write to train.log (a full disk) is silent; any other logging error is reported as usual."""
    import logging

    from deltatune.cli.output import run_log

    with run_log(str(tmp_path)):
        handler = next(
            h for h in logging.getLogger("deltatune").handlers if isinstance(h, logging.FileHandler)
        )
        record = logging.LogRecord("deltatune", logging.WARNING, __file__, 1, "x", None, None)
        capsys.readouterr()
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            handler.handleError(record)
        assert "Logging error" not in capsys.readouterr().err
        try:
            raise TypeError("%d format: a real number is required, not str")
        except TypeError:
            handler.handleError(record)
        assert "Logging error" in capsys.readouterr().err


def test_warnings_outside_a_run_are_one_line_each(capfd: pytest.CaptureFixture[str]) -> None:
    """evaluate/predict/merge: a library's warning is one ``[deltatune] warning:`` line, no source file or line
    of the library, a line break in a name shown as ``\\n``; ``--debug`` hands it to Python's printer."""
    import warnings

    from deltatune.cli import _show_warnings_printably

    saved = warnings.showwarning
    given: list[tuple[str, str]] = []
    try:
        for debug in (False, True):
            warnings.showwarning = lambda message, category, filename, *_: given.append(
                (str(message), filename)
            )
            _show_warnings_printably(debug)
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("skipped unreadable image 'new\nline/x.png'", RuntimeWarning, stacklevel=1)
            err = capfd.readouterr().err
            if debug:
                assert err == "" and given == [("skipped unreadable image 'new\nline/x.png'", __file__)]
            else:
                assert (
                    err == "[deltatune] warning: skipped unreadable image 'new\\nline/x.png'\n" and not given
                )
    finally:
        warnings.showwarning = saved


def test_names_in_tables_and_notices_stay_on_one_line(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A class or file name with a line break never splits a table row or a log line."""
    import logging

    from PIL import Image

    from deltatune.cli.output import esc
    from deltatune.vision import transforms

    assert esc("new\nline [bold]") == "new\\nline \\[bold]"
    path = tmp_path / "new\nline.png"
    Image.new("I;16", (4, 4), 300).save(path)
    saved = list(transforms._warned_wide)
    transforms._warned_wide.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="deltatune"), Image.open(path) as image:
            transforms._warn_wide_once(image)
    finally:
        transforms._warned_wide[:] = saved
    (message,) = [r.getMessage() for r in caplog.records if "mode)" in r.getMessage()]
    assert "\n" not in message and "new\\nline.png" in message


def test_the_console_images_per_second_is_the_recorded_one(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The epoch line's images/s is the number metrics.json and trainer_state.json keep for that epoch."""
    import json

    out = tmp_path / "r"
    argv = ["train", "--model", assets["model"], "--dataset", assets["data"], "--output_dir", str(out)]
    fast = [
        a
        for a in FAST
        if a not in ("--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1")
    ]
    more = [
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "4",
        "--num_train_epochs",
        "2",
    ]
    assert main([*argv, *fast, *more]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = [
        line.split()[5]
        for line in lines[lines.index(EpochReporter.HEADER) + 1 :]
        if re.match(r"^\s+\d", line)
    ]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    recorded = [h["train_samples_per_second_epoch"] for h in history if "train_samples_per_second_epoch" in h]
    assert len(shown) == 2 and shown == [f"{r:.0f}" for r in recorded], (shown, recorded)
