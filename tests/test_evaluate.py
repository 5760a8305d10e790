"""``evaluate``, ``predict`` and ``merge`` at the seams: every image of a folder scored once, classes matched by
name, a run's own results kept, unreadable images named, hidden files skipped, non-ASCII JSON, train's thread
choice, an unreachable hub id given up at once, and two merges into one folder."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_trained_run, write_image_folder

from deltatune.cli import checks, main


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_trained_run(tmp_path_factory.mktemp("evaluate"), per_class=6)


def _results(folder: str | Path) -> dict[str, Any]:
    return json.loads(Path(folder, "eval_results.json").read_text())


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deltatune: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_dataset_folder_scores_every_image(run: str, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", per_class=20, seed=3)
    assert main(["evaluate", "--adapter", run, "--dataset", data, "--output_dir", str(tmp_path / "a")]) == 0
    assert _results(tmp_path / "a")["eval_samples"] == 60
    assert (
        main(["evaluate", "--adapter", run, "--validation_dir", data, "--output_dir", str(tmp_path / "b")])
        == 0
    )
    assert _results(tmp_path / "b")["eval_samples"] == 60
    capped = ["--output_dir", str(tmp_path / "c"), "--max_eval_samples", "7"]
    assert main(["evaluate", "--adapter", run, "--dataset", data, *capped]) == 0
    assert _results(tmp_path / "c")["eval_samples"] == 7
    split = tmp_path / "split"
    write_image_folder(split / "train", per_class=4)
    write_image_folder(split / "validation", per_class=2, seed=5)
    assert (
        main(["evaluate", "--adapter", run, "--dataset", str(split), "--output_dir", str(tmp_path / "d")])
        == 0
    )
    assert (
        _results(tmp_path / "d")["eval_samples"] == 6
    )  # a train/ + validation/ folder: its validation images


def test_classes_are_matched_by_name(run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = Path(write_image_folder(tmp_path / "data", per_class=4, seed=3))
    shutil.rmtree(data / "bright")  # a subset of the classes (dark is now first by position): scored by name
    assert (
        main(["evaluate", "--adapter", run, "--dataset", str(data), "--output_dir", str(tmp_path / "o")]) == 0
    )
    report = _results(tmp_path / "o")
    assert report["eval_samples"] == 8 and set(report["per_class_accuracy"]) == {"bright", "dark", "red"}
    # every class listed, as the run's own eval_results.json lists them: one with no image is null, with a note
    assert report["per_class_accuracy"]["bright"] is None and "'bright'" in " ".join(report["notes"])
    confusion = np.array(report["confusion_matrix"])
    assert (
        confusion[0].sum() == 0 and confusion[1].sum() == 4 and confusion[2].sum() == 4
    )  # bright, dark, red

    other = Path(write_image_folder(tmp_path / "other", per_class=2))
    for old, new in (("bright", "cat"), ("dark", "dog")):
        (other / old).rename(other / new)
    assert (
        main(["evaluate", "--adapter", run, "--dataset", str(other), "--output_dir", str(tmp_path / "x")])
        == 2
    )
    line = _error(capsys)
    assert "2 class(es) the adapter was not trained on: 'cat', 'dog'" in line and "'bright'" in line
    assert not (tmp_path / "x").exists()


def test_a_runs_own_results_are_kept_unless_overwrite(run: str, tmp_path: Path) -> None:
    copy = shutil.copytree(run, tmp_path / "run")
    own = {n: (copy / n).read_bytes() for n in ("eval_results.json", "all_results.json")}
    assert main(["evaluate", "--adapter", str(copy)]) == 0
    assert {n: (copy / n).read_bytes() for n in own} == own and (
        copy / "evaluate" / "eval_results.json"
    ).is_file()
    before = json.loads(own["all_results.json"])
    assert "eval_loss" in before and "train_loss" in before
    assert main(["evaluate", "--adapter", str(copy), "--overwrite"]) == 0
    after = json.loads((copy / "all_results.json").read_text())
    assert after["train_loss"] == before["train_loss"]
    # no two evaluations mixed: every eval_ key is this evaluation's
    assert {k: v for k, v in after.items() if k.startswith("eval_")} == {
        k: v for k, v in _results(copy).items() if k.startswith("eval_") and not isinstance(v, dict | list)
    }


_RESULTS = ("eval_results.json", "all_results.json", "confusion_matrix.png")


def _files(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in _RESULTS}


def test_a_folder_holding_results_is_refused_unless_overwrite(
    run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another run's folder, or the run's own, as --output_dir: refused in one line before any work (exit 2);
    with --overwrite replaced, and all_results.json never mixes two runs."""
    own, other = shutil.copytree(run, tmp_path / "own"), shutil.copytree(run, tmp_path / "other")
    before = {folder: _files(folder) for folder in (own, other)}
    data = write_image_folder(tmp_path / "data", per_class=3, seed=4)
    for folder in (other, own):
        argv = ["evaluate", "--adapter", str(own), "--validation_dir", data, "--output_dir", str(folder)]
        assert main(argv) == 2, folder
        captured = capsys.readouterr()
        errors = [x for x in captured.err.splitlines() if x.startswith("deltatune: error:")]
        assert len(errors) == 1 and repr(str(folder)) in errors[0], errors
        assert all(n in errors[0] for n in _RESULTS) and "--overwrite" in errors[0], errors[0]
        assert "scoring" not in captured.out  # refused before loading or scoring anything
        assert _files(folder) == before[folder] and not (folder / "evaluate").exists()

    argv = ["evaluate", "--adapter", str(own), "--validation_dir", data, "--output_dir", str(other)]
    assert main([*argv, "--overwrite"]) == 0
    written = _results(other)
    assert written["eval_samples"] == 9 and written["dataset"] == data
    combined = json.loads((other / "all_results.json").read_text())
    # all_results.json: this evaluation's keys only, none of the other run's
    assert combined == {k: v for k, v in written.items() if not isinstance(v, dict | list)}
    assert (other / "confusion_matrix.png").read_bytes() != before[other]["confusion_matrix.png"]

    ran = json.loads(before[own]["all_results.json"])
    argv = ["evaluate", "--adapter", str(own), "--validation_dir", data, "--output_dir", str(own)]
    assert main([*argv, "--overwrite"]) == 0
    combined = json.loads((own / "all_results.json").read_text())
    # in the run's own folder its train_* keys stay; its own evaluation is not mixed with this one
    assert combined["train_loss"] == ran["train_loss"] and combined["eval_samples"] == 9
    assert combined["eval_loss"] == _results(own)["eval_loss"] != ran["eval_loss"]


def test_a_second_evaluation_does_not_replace_the_first(
    run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --output_dir results go to DIR/evaluate/; a second evaluation is refused there, not replacing it."""
    copy = shutil.copytree(run, tmp_path / "run")
    first, second = (write_image_folder(tmp_path / n, per_class=2, seed=s) for n, s in (("a", 1), ("b", 2)))
    assert main(["evaluate", "--adapter", str(copy), "--validation_dir", first]) == 0
    capsys.readouterr()
    kept = _files(copy / "evaluate")
    assert main(["evaluate", "--adapter", str(copy), "--validation_dir", second]) == 2
    line = _error(capsys)
    folder = str(copy / "evaluate")
    assert repr(folder) in line and f"--output_dir {folder!r} --overwrite" in line, line
    assert _files(copy / "evaluate") == kept and _results(copy / "evaluate")["dataset"] == first
    again = ["evaluate", "--adapter", str(copy), "--validation_dir", second, "--output_dir", folder]
    assert main([*again, "--overwrite"]) == 0
    assert _results(copy / "evaluate")["dataset"] == second


def test_unreadable_images_are_skipped_and_named(
    run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = Path(write_image_folder(tmp_path / "data", per_class=3))
    (data / "red" / "9.png").write_bytes(b"not an image")
    assert (
        main(["evaluate", "--adapter", run, "--dataset", str(data), "--output_dir", str(tmp_path / "o")]) == 0
    )
    report = _results(tmp_path / "o")
    assert report["eval_samples"] == 9 and report["eval_skipped"] == 1  # not replaced by a neighbour
    assert report["skipped_images"] == [str(data / "red" / "9.png")]
    assert f"skipped 1 unreadable image(s): {data / 'red' / '9.png'}" in capsys.readouterr().out


def test_predict_skips_hidden_files_and_keeps_non_ascii(
    run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "fotos"
    (folder / ".cache").mkdir(parents=True)
    Image.new("RGB", (20, 30), (200, 10, 10)).save(folder / "größe 猫.png")
    (folder / "._größe 猫.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / ".DS_Store.png").write_bytes(b"junk")
    Image.new("RGB", (8, 8)).save(folder / ".cache" / "thumb.png")
    capsys.readouterr()
    assert main(["predict", str(folder), "--adapter", run, "--json"]) == 0
    out = capsys.readouterr().out
    assert "größe 猫.png" in out and "\\u" not in out
    assert [Path(r["image"]).name for r in json.loads(out)] == ["größe 猫.png"]


def test_predict_and_evaluate_use_trains_thread_choice(
    run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltatune.tasks.inference import evaluate_adapter, load_trained, predict_images
    from deltatune.vision import ImageFolderDataset

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trained = load_trained(run)
        seen: list[int] = []
        trained.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        data = Path(write_image_folder(tmp_path / "data", per_class=1))
        predict_images(trained, [str(data / "red" / "0.png")], progress=False)
        evaluate_adapter(trained, ImageFolderDataset.from_directory(data), progress=False)
        assert seen == [1, 1] and torch.get_num_threads() == 2  # one thread for a small model, then restored
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def silent_hub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The Hub probe times out (as a silent network does), counted; the process-wide switches restored."""
    from huggingface_hub import constants

    calls: list[str] = []

    def unreachable(request: urllib.request.Request, timeout: float = 0.0) -> object:
        calls.append(request.full_url)
        raise urllib.error.URLError(TimeoutError("timed out"))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(checks, "_switched_offline", [])
    monkeypatch.setattr(checks.urllib.request, "urlopen", unreachable)
    checks._probe.cache_clear()
    yield calls
    checks._probe.cache_clear()


@pytest.mark.parametrize("command", ["predict", "evaluate", "merge"])
def test_unreachable_hub_id_fails_at_once_in_one_line(
    run: str,
    tmp_path: Path,
    command: str,
    silent_hub: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    copy = shutil.copytree(run, tmp_path / "run")
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "acme/vit"}))
    extra = {"predict": [str(copy / "README.md")], "evaluate": [], "merge": ["--output", str(tmp_path / "m")]}
    assert main([command, "--adapter", str(copy), *extra[command]]) == 2
    line = _error(capsys)
    assert "the adapter's base model (base_model_name_or_path in" in line and "'acme/vit'" in line
    assert "could not be reached: timed out" in line
    assert len(silent_hub) == 1  # one short probe, no retries


def test_unreachable_hub_dataset_fails_at_once_in_one_line(
    run: str,
    tmp_path: Path,
    silent_hub: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert main(["evaluate", "--adapter", run, "--dataset", "acme/pets"]) == 2
    line = _error(capsys)
    assert "--dataset 'acme/pets': not a local folder" in line and "could not be reached: timed out" in line
    assert len(silent_hub) == 1


def test_two_merges_into_one_new_folder_one_wins(
    run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltatune.tasks import merge as merging
    from deltatune.tasks.inference import load_trained
    from deltatune.tasks.merge import check_merge_output

    out = str(tmp_path / "merged")
    both_built = threading.Barrier(2, timeout=120)
    write = merging._write_merged

    def write_then_wait(build: str, merged: Any, trained: Any, *rest: Any) -> None:
        write(build, merged, trained, *rest)
        both_built.wait()  # the two builds exist before either moves in: a real race, by state not time

    monkeypatch.setattr(merging, "_write_merged", write_then_wait)
    outcomes: list[str] = []

    def merge_once() -> None:
        check_merge_output(run, out, overwrite=False)
        try:
            merging.merge_adapter(load_trained(run), out, overwrite=False)
            outcomes.append("merged")
        except ValueError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=merge_once) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(outcomes) == 2 and outcomes.count("merged") == 1, outcomes
    assert any("was filled by another process while this merge ran" in o for o in outcomes), outcomes
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(out))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_model_builds_hold_the_build_lock(run: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers swaps ``PreTrainedModel.tie_weights`` for a no-op while it loads and puts back what it found;
    two loads at once in two threads (the merges above) could leave tying off for the whole process. Every
    deltatune build holds one lock, so the swaps never overlap."""
    from transformers import initialization

    from deltatune._loading import MODEL_BUILD_LOCK
    from deltatune.tasks.inference import load_trained

    held: list[bool] = []
    swap = initialization.no_tie_weights

    @contextlib.contextmanager
    def recording_swap() -> Iterator[None]:
        held.append(MODEL_BUILD_LOCK._is_owned())  # type: ignore[attr-defined]
        with swap():
            yield

    monkeypatch.setattr(initialization, "no_tie_weights", recording_swap)
    load_trained(run)
    assert held == [True]


def test_validation_folder_missing_a_class_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from deltatune.vision import load_image_dataset

    train = write_image_folder(tmp_path / "train", per_class=2)
    val = Path(write_image_folder(tmp_path / "val", per_class=1))
    shutil.rmtree(val / "dark")
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        load_image_dataset(train, validation_dir=str(val))
    assert "has no images of 1 training class(es): dark" in caplog.text


def test_no_progress_bar_frames_when_stderr_is_not_a_terminal(
    run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Piped into a file or a CI log, ``predict`` and ``evaluate`` draw no bar (carriage-return frames), as
    ``train`` prints plain lines."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 90, 10)).save(folder / f"{i}.png")
    data = write_image_folder(tmp_path / "data", per_class=2)
    capsys.readouterr()
    assert main(["predict", str(folder), "--adapter", run, "--batch_size", "1"]) == 0
    assert main(["evaluate", "--adapter", run, "--dataset", data, "--output_dir", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "img/s" not in err and "batch/s" not in err, err


def test_evaluate_writes_the_runs_keys_and_its_eval_loss(run: str, tmp_path: Path) -> None:
    """``evaluate``'s eval_results.json has the keys of the run's own file of that name: ``eval_loss`` (the
    quantity the run picked its best checkpoint by), equal to the run's on the same split; top-5 absent with
    five classes or fewer, as in the run's."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["evaluate", "--adapter", str(copy), "--output_dir", str(tmp_path / "e")]) == 0
    ours, runs = _results(tmp_path / "e"), _results(copy)
    assert "eval_top5_accuracy" not in ours and "eval_top5_accuracy" not in runs
    assert {"eval_loss", "eval_accuracy", "eval_samples"} <= set(ours) & set(runs)
    assert ours["eval_samples"] == runs["eval_samples"] and ours["eval_accuracy"] == runs["eval_accuracy"]
    assert ours["eval_loss"] == pytest.approx(runs["eval_loss"], abs=1e-4), (
        ours["eval_loss"],
        runs["eval_loss"],
    )
