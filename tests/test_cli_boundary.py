"""The command line never prints a silently wrong result or a traceback (issue 11, items 9-11, 16, 18): fewer
than two classes refused and strict JSON only, recipe batches fitted to small data with a notice, unreadable
images skipped and bad sizes refused, user-supplied names printed as written, and every failure one line
with an exit status (2 usage, 1 otherwise) -- the traceback only with --debug."""

from __future__ import annotations

import builtins
import errno
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tiny import TINY_RUN_FLAGS, tiny_trained_run

import deltatune._files
import deltatune.tasks.inference
from deltatune._files import write_json
from deltatune.cli import main
from deltatune.train.metrics import classification_report


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("boundary")
    run = tiny_trained_run(root, per_class=8)
    return {"root": str(root), "model": str(root / "model"), "data": str(root / "data"), "run": run}


def train_argv(assets: dict[str, str], out: Path | str, *, dataset: str | None = None) -> list[str]:
    return [
        "train",
        "--model",
        assets["model"],
        "--dataset",
        dataset or assets["data"],
        "--output_dir",
        str(out),
    ]


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("deltatune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def strict_loads(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


# ---- item 9 -------------------------------------------------------------------------------------
def test_one_class_is_refused_and_json_output_is_strict(
    assets: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    single = tmp_path / "single"
    shutil.copytree(Path(assets["data"]) / "red", single / "red")
    assert main([*train_argv(assets, tmp_path / "out", dataset=str(single)), *TINY_RUN_FLAGS]) == 2
    assert "at least 2" in one_error(capsys)
    assert not (tmp_path / "out").exists()  # refused before it started: no folder, no empty train.log
    for name in ("metrics.json", "deltatune_run.json", "labels.json"):
        strict_loads((Path(assets["run"]) / name).read_text())
    report = classification_report(np.array([[2.0, 0.0, 0.0]]), np.array([0]), ["a", "b", "c"])
    write_json(tmp_path / "eval.json", report.to_dict())
    written = strict_loads((tmp_path / "eval.json").read_text())
    assert written["per_class_accuracy"]["b"] is None and "'b'" in " ".join(written["notes"])
    nan_result = [{"image": "a.png", "predictions": [{"label": "red", "score": math.nan}]}]
    monkeypatch.setattr(deltatune.tasks.inference, "predict_images", lambda *a, **k: nan_result)
    image = str(Path(assets["data"]) / "red" / "0.png")
    assert main(["predict", image, "--adapter", assets["run"], "--json"]) == 0
    assert strict_loads(capsys.readouterr().out)[0]["predictions"][0]["score"] is None


# ---- item 10 ------------------------------------------------------------------------------------
def test_recipe_batch_is_fitted_to_small_data_and_said(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    flags = ["--num_train_epochs", "1", "--use_cpu", "--disable_tqdm", "true", "--seed", "0"]
    assert main([*train_argv(assets, out), *flags, "--validation_split", "0.25", "--r", "2"]) == 0
    notice = [line for line in capsys.readouterr().err.splitlines() if "fitted to" in line]
    assert len(notice) == 1 and "18 training images" in notice[0] and "128 x 4" in notice[0], notice
    steps = [e["step"] for e in json.loads((out / "metrics.json").read_text())["history"] if "step" in e]
    assert max(steps) >= 8, f"one epoch of 18 images must give several optimiser steps, got {max(steps)}"


# ---- item 11 ------------------------------------------------------------------------------------
def test_predict_skips_unreadable_images_and_refuses_bad_sizes(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        shutil.copy(Path(assets["data"]) / "red" / f"{i}.png", folder / f"good{i}.png")
    data = (folder / "good0.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("not an image")
    assert main(["predict", str(folder), "--adapter", assets["run"], "--json", "--batch_size", "2"]) == 0
    captured = capsys.readouterr()
    results = {Path(r["image"]).name: r for r in strict_loads(captured.out)}
    assert {n for n, r in results.items() if r["predictions"]} == {"good0.png", "good1.png", "good2.png"}
    assert results["truncated.png"]["error"] and results["text.png"]["error"]
    assert "skipped 2 of 5 images" in captured.err
    for size in ("-1", "0"):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", str(folder), "--adapter", assets["run"], "--batch_size", size])
        assert exit_info.value.code == 2
        assert "at least 1" in capsys.readouterr().err


# ---- item 16 ------------------------------------------------------------------------------------
def test_names_and_paths_print_as_written(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Class names with rich markup or terminal escape sequences, and paths with a closing tag ``[/x]``."""
    data = tmp_path / "data"
    shutil.copytree(Path(assets["data"]) / "red", data / "[red]apple")
    shutil.copytree(Path(assets["data"]) / "dark", data / "dark\x1b]0;pwned\x07\x1b[2J")
    out = tmp_path / "out[" / "x]"  # printed as .../out[/x]
    assert main([*train_argv(assets, out, dataset=str(data)), *TINY_RUN_FLAGS]) == 0
    image = data / "[red]apple" / "0.png"
    assert main(["predict", str(image), "--adapter", str(out)]) == 0
    assert main(["evaluate", "--adapter", str(out)]) == 0
    assert main(["merge", "--adapter", str(out), "--output", str(tmp_path / "merged[" / "y]")]) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "\x1b" not in printed and "\x07" not in printed, "control characters must not reach the terminal"
    flat = "".join(captured.out.split())  # rich wraps long lines
    assert "[red]apple" in flat and "out[/x]" in flat and "\\x1b" in flat


# ---- item 18 ------------------------------------------------------------------------------------
def adapter_copy(assets: dict[str, str], tmp_path: Path) -> Path:
    target = tmp_path / "adapter"
    shutil.copytree(assets["run"], target, ignore=shutil.ignore_patterns("checkpoint-*"))
    return target


def edit(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


CASES = [
    "base_model_gone",
    "offline_hub_id",
    "bad_preprocessor_config",
    "permission_denied",
    "disk_full",
    "path_too_long",
    "output_is_a_file",
    "invalid_regex",
    "deeply_nested_config",
    "non_finite_loss",
]


def _scenario(
    case: str, assets: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], int, str]:
    """(argv, expected status, a fragment the message must hold) for one failure at the CLI boundary."""
    image = str(Path(assets["data"]) / "red" / "0.png")
    if case == "base_model_gone":
        adapter = adapter_copy(assets, tmp_path)
        edit(adapter / "adapter_config.json", base_model_name_or_path="/nonexistent/moved/vit")
        return ["predict", image, "--adapter", str(adapter)], 2, "--model"
    if case == "offline_hub_id":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        return (
            ["predict", image, "--adapter", assets["run"], "--model", "no-such-org/no-such-vit"],
            2,  # checked before loading, as train checks --model
            "no-such-org/no-such-vit",
        )
    if case == "bad_preprocessor_config":
        adapter = adapter_copy(assets, tmp_path)
        (adapter / "preprocessor_config.json").write_text("{not json")
        return ["predict", image, "--adapter", str(adapter)], 2, "preprocessor_config.json"
    if case == "permission_denied":
        original = builtins.open

        def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if str(file).endswith("labels.json"):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return original(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
        return ["predict", image, "--adapter", assets["run"]], 1, "labels.json"
    if case == "disk_full":

        def full(path: Any, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(deltatune._files, "atomic_write_bytes", full)
        return [*train_argv(assets, tmp_path / "out"), *TINY_RUN_FLAGS], 1, "no space left"
    if case == "path_too_long":
        return [*train_argv(assets, tmp_path / ("x" * 300)), *TINY_RUN_FLAGS], 2, "too long"
    if case == "output_is_a_file":
        (tmp_path / "file").write_text("x")
        return (
            ["merge", "--adapter", assets["run"], "--output", str(tmp_path / "file"), "--overwrite"],
            2,
            "is a file",
        )
    if case == "invalid_regex":
        adapter = adapter_copy(assets, tmp_path)
        edit(adapter / "adapter_config.json", rank_pattern={"q_proj(": 2})
        return ["predict", image, "--adapter", str(adapter)], 2, "regular expression"
    if case == "deeply_nested_config":
        adapter = adapter_copy(assets, tmp_path)
        (adapter / "preprocessor_config.json").write_text(nested(100_000))
        return ["predict", image, "--adapter", str(adapter)], 2, "preprocessor_config.json"
    assert case == "non_finite_loss"
    original_step = transformers.Trainer.training_step
    monkeypatch.setattr(
        transformers.Trainer,
        "training_step",
        lambda self, *a, **k: original_step(self, *a, **k) * torch.tensor(float("nan")),
    )
    return [*train_argv(assets, tmp_path / "out"), *TINY_RUN_FLAGS], 1, "training loss became nan"


@pytest.mark.parametrize("case", CASES)
def test_every_failure_is_one_line_with_an_exit_status(
    assets: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    argv, status, fragment = _scenario(case, assets, tmp_path, monkeypatch)
    assert main(argv) == status
    line = one_error(capsys)
    assert fragment in line, line


def test_debug_shows_the_traceback(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*train_argv(assets, tmp_path / ("x" * 300)), *TINY_RUN_FLAGS]
    assert main([*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "too long" in err.strip().splitlines()[-1]


def test_image_with_too_many_pixels_is_skipped_before_decoding(
    assets: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 - 1)
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(big)
    good = Path(assets["data"]) / "red" / "0.png"
    shutil.copy(good, tmp_path / "small.png")
    Image.open(good).resize((20, 20)).save(tmp_path / "small.png")
    assert main(["predict", str(big), str(tmp_path / "small.png"), "--adapter", assets["run"], "--json"]) == 0
    results = {Path(r["image"]).name: r for r in strict_loads(capsys.readouterr().out)}
    assert "pixels" in results["big.png"]["error"] and results["small.png"]["predictions"]


def test_a_base_model_folder_that_is_no_model_is_a_usage_error(tmp_path: Path) -> None:
    """An existing local folder that holds no model (a typo'd or moved base path) is the user's input: a
    ValueError (exit 2) naming the folder, not an OSError (exit 1) as for the network or the disk."""
    from deltatune.cli.errors import describe_error
    from deltatune.tasks.classifier import build_base_model

    folder = tmp_path / "not a model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="that folder is not a model") as err:
        build_base_model(str(folder), {0: "a", 1: "b"})
    message, status = describe_error(err.value)
    assert status == 2 and "not a model" in message and "\n" not in message
