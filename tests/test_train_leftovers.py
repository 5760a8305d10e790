"""What `deltatune train` leaves behind: a run refused before it starts leaves no folder (or log) of its own,
so the next run into that folder works, and says why the data was refused; and an evaluation that skips
unreadable images counts and names them as `deltatune evaluate` does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny import save_tiny_vit_dir, write_image_folder

from deltatune.cli import main

FLAGS = [
    "--max_steps", "1", "--per_device_train_batch_size", "4", "--use_cpu", "--disable_tqdm", "true",
    "--seed", "0", "--method", "lora", "--r", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("leftovers")
    save_tiny_vit_dir(root / "model")
    write_image_folder(root / "plain", per_class=6)
    one_class = root / "emp"  # class `a` holds only a hidden file: one class has images
    (one_class / "a").mkdir(parents=True)
    (one_class / "a" / ".DS_Store").write_bytes(b"\0")
    (one_class / "b").mkdir()
    (one_class / "b" / "0.png").write_bytes((root / "plain" / "bright" / "0.png").read_bytes())
    return {"model": str(root / "model"), "plain": str(root / "plain"), "emp": str(one_class)}


def train(assets: dict[str, str], data: str, out: Path, *extra: str) -> int:
    argv = ["train", "--model", assets["model"], "--train_dir", data, "--output_dir", str(out)]
    return main([*argv, *FLAGS, *extra])


def test_refused_run_leaves_no_folder_and_the_next_run_works(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "y1"
    assert train(assets, assets["emp"], out) == 2
    error = capsys.readouterr().err
    assert "class 'a'" in error and "has no images" in error and "two classes" in error, error
    assert "eval split" not in error
    assert not out.exists()  # the folder it created is gone, train.log with it
    assert train(assets, assets["plain"], out) == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_refused_run_keeps_the_users_folder_as_it_was(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert train(assets, assets["emp"], mine) == 2
    assert sorted(os.listdir(mine)) == ["notes.txt"]  # neither the folder nor the user's file removed
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(assets, assets["emp"], empty) == 2
    assert empty.is_dir() and os.listdir(empty) == []


def test_a_leftover_train_log_is_deltatunes_own(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder holding only the train.log of a refused run (an earlier version left it) takes the next run;
    with a file of the user's beside it, the refusal names the user's file only."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "train.log").write_text("the run stopped: ValueError\n")
    (mixed / "notes.txt").write_text("mine")
    assert train(assets, assets["plain"], mixed) == 2
    error = capsys.readouterr().err
    assert "(notes.txt)" in error and "train.log" not in error, error
    assert sorted(os.listdir(mixed)) == ["notes.txt", "train.log"]
    (mixed / "notes.txt").unlink()
    assert train(assets, assets["plain"], mixed) == 0
    log = (mixed / "train.log").read_text()
    assert "the run stopped: ValueError" not in log  # the new run's log starts clean


@pytest.mark.parametrize("workers", [0, 1], ids=["main-process", "dataloader-worker"])
def test_train_counts_skipped_eval_images_as_evaluate_does(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    """With DataLoader workers (GPU runs use them) the names are found in the workers' copies of the dataset:
    they reach the main process in the batches."""
    val = Path(write_image_folder(tmp_path / "plainc", per_class=2, seed=1))  # 6 readable images
    (val / "bright" / "bad.png").write_bytes(b"not an image")
    (val / "dark" / "trunc.jpg").write_bytes((val / "dark" / "0.png").read_bytes()[:300])
    os.symlink("/etc/passwd", val / "red" / "link.png")
    out = tmp_path / "run"
    assert (
        train(
            assets,
            assets["plain"],
            out,
            "--validation_dir",
            str(val),
            "--dataloader_num_workers",
            str(workers),
        )
        == 0
    )
    shown = capsys.readouterr().out
    results = json.loads((out / "eval_results.json").read_text())
    assert sum(map(sum, results["confusion_matrix"])) == results["eval_samples"] == 6
    assert results["eval_skipped"] == 3
    names = ("bad.png", "trunc.jpg", "link.png")
    assert sorted(os.path.basename(p) for p in results["skipped_images"]) == sorted(names)
    combined = json.loads((out / "all_results.json").read_text())
    assert (combined["eval_samples"], combined["eval_skipped"]) == (6, 3)
    assert json.loads((out / "metrics.json").read_text())["num_eval"] == 6
    line = next(x for x in " ".join(shown.split()).split("skipped ")[1:] if x.startswith("3 unreadable"))
    assert all(name in line for name in names), shown
