"""A resume continues a run only on the files it started with (u-cli's U3): the run record keeps a cheap
fingerprint of the local data and model folders, and ``--resume_from_checkpoint`` on a folder whose images
were added, removed or moved, or whose model weights were replaced, is refused in one line naming what
changed; a record written before fingerprints existed still resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tiny import save_tiny_vit_dir, write_image_folder

from deltatune.cli import main
from deltatune.train.fingerprint import fingerprint_changes, folder_fingerprint, model_fingerprint
from deltatune.train.outputs import OutputDirError, prepare_output_dir, write_run_record
from deltatune.train.trainer import DeltaTrainer

FLAGS = [
    "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--use_cpu", "--disable_tqdm", "true",
    "--seed", "0", "--validation_split", "0.25", "--method", "lora", "--r", "2",
]  # fmt: skip


def record_of(fingerprint: dict[str, Any] | None, dataset: str = "data") -> dict[str, Any]:
    record: dict[str, Any] = {"method": "lora", "dataset": dataset, "model": "model", "training": {"seed": 0}}
    if fingerprint is not None:
        record["fingerprint"] = fingerprint
    return record


def test_the_fingerprint_names_files_added_moved_and_replaced_and_ignores_hidden_and_output(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    for name in ("a/0.png", "a/1.png", "b/0.png"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(b"x" * 10)
    before = {"dataset": folder_fingerprint(data, {".png"})}
    (data / ".DS_Store").write_bytes(b"finder")  # hidden, as the image loader skips it
    (data / "a" / "notes.txt").write_text("not an image")
    (data / "out").mkdir()  # a run's output folder inside its data folder
    (data / "out" / "training_curve.png").write_bytes(b"plot")
    same = {"dataset": folder_fingerprint(data, {".png"}, exclude=[str(data / "out")])}
    assert fingerprint_changes(record_of(before), record_of(same)) == []

    (data / "b" / "1.png").write_bytes(b"y" * 10)
    added = {"dataset": folder_fingerprint(data, {".png"}, exclude=[str(data / "out")])}
    (changes,) = fingerprint_changes(record_of(before), record_of(added))
    assert changes == "--dataset 'data' changed on disk since the run started: 1 file added (b: 1 → 2)"

    (data / "b" / "1.png").unlink()
    (data / "a" / "1.png").rename(data / "b" / "1.png")
    (moved,) = fingerprint_changes(
        record_of(before), record_of({"dataset": folder_fingerprint(data, {".png"}, [str(data / "out")])})
    )
    assert "files moved between folders (a: 2 → 1, b: 1 → 2)" in moved
    (data / "b" / "1.png").rename(data / "a" / "1.png")
    (data / "a" / "1.png").write_bytes(b"x" * 11)
    (resized,) = fingerprint_changes(
        record_of(before), record_of({"dataset": folder_fingerprint(data, {".png"}, [str(data / "out")])})
    )
    assert resized.endswith("files renamed, replaced or resized")
    assert fingerprint_changes(record_of(None), record_of(added)) == [], "an old record has no fingerprint"
    other = record_of(added, dataset="elsewhere")  # another folder is a difference of the record itself
    assert fingerprint_changes(record_of(before), other) == []


def test_the_model_fingerprint_sees_replaced_weights_but_not_a_readme(tmp_path: Path) -> None:
    model = Path(save_tiny_vit_dir(tmp_path / "model"))
    before = model_fingerprint(model)
    assert before is not None and set(before) == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    }
    (model / "README.md").write_text("a model card edit changes nothing")
    assert model_fingerprint(model) == before
    shutil.rmtree(model)
    save_tiny_vit_dir(model, seed=1)  # re-downloaded or replaced in place: same names and sizes
    after = model_fingerprint(model)
    assert after is not None and after["model.safetensors"] != before["model.safetensors"]
    (change,) = fingerprint_changes(
        {"model": "m", "fingerprint": {"model": before}}, {"model": "m", "fingerprint": {"model": after}}
    )
    assert change == "--model 'm' changed on disk since the run started: model.safetensors changed"
    assert (
        model_fingerprint(tmp_path / "no-such") is None and folder_fingerprint(tmp_path / "no-such") is None
    )


def test_prepare_output_dir_refuses_changed_files_and_resumes_an_old_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    old = {"dataset": {"files": 2, "bytes": 20, "sha256": "a", "folders": {"a": 1, "b": 1}}}
    new = {"dataset": {"files": 3, "bytes": 30, "sha256": "b", "folders": {"a": 1, "b": 2}}}
    write_run_record(out, record_of(old), "running")
    with pytest.raises(OutputDirError) as refused:
        prepare_output_dir(str(out), record_of(new), False, "true")
    line = str(refused.value)
    assert "\n" not in line and "holds this run, but --dataset 'data' changed on disk" in line
    assert "1 file added (b: 1 → 2)" in line and "--overwrite_output_dir" in line and "--output_dir" in line
    assert prepare_output_dir(str(out), record_of(old), False, "true") == str(out / "checkpoint-2")
    write_run_record(out, record_of(None), "running")  # written before fingerprints existed
    assert prepare_output_dir(str(out), record_of(new), False, "true") == str(out / "checkpoint-2")


def test_a_resume_on_changed_images_or_replaced_weights_is_refused_and_the_same_files_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data, out = tmp_path / "model", tmp_path / "data", tmp_path / "out"
    save_tiny_vit_dir(model)
    write_image_folder(data, per_class=6)
    original = DeltaTrainer._save_checkpoint

    def save_then_interrupt(self: DeltaTrainer, model: Any, trial: Any) -> None:
        original(self, model, trial)
        raise KeyboardInterrupt  # Ctrl-C right after the first checkpoint is complete

    argv = ["train", "--model", str(model), "--dataset", str(data), "--output_dir", str(out), *FLAGS]
    with monkeypatch.context() as patch:
        patch.setattr(DeltaTrainer, "_save_checkpoint", save_then_interrupt)
        assert main(argv) == 130
    capsys.readouterr()
    resume = [*argv, "--resume_from_checkpoint", "true"]
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    write_image_folder(tmp_path / "more", per_class=2, seed=5)
    for image in (tmp_path / "more").rglob("*.png"):
        shutil.copy(image, data / image.parent.name / f"new_{image.name}")
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert f"--dataset '{data}' changed on disk since the run started: 6 files added" in err
    assert "--overwrite_output_dir" in err and len(err.strip().splitlines()) == 1, err
    for image in data.rglob("new_*.png"):
        image.unlink()

    shutil.rmtree(model)
    save_tiny_vit_dir(model, seed=1)
    assert main(resume) == 2
    assert f"--model '{model}' changed on disk since the run started: model.safetensors changed" in (
        capsys.readouterr().err
    )
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == listing, "a refusal touches nothing"

    shutil.rmtree(model)
    save_tiny_vit_dir(model)  # the same files again: the run continues
    assert main(resume) == 0
    assert json.loads((out / "deltatune_run.json").read_text())["status"] == "finished"


def test_compare_holds_and_checks_each_run_folder_as_train_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """u-cli's U11: a `train` run made in a compare's sub-run folder while the compare runs is not replaced
    silently, and a live run's lock there is honoured."""
    import subprocess
    import sys

    import deltatune.tasks.compare as compare

    model, data, out = tmp_path / "model", tmp_path / "data", tmp_path / "cmp"
    save_tiny_vit_dir(model)
    write_image_folder(data, per_class=4)
    argv = ["compare", "--methods", "lora", "--baselines", "--model", str(model), "--dataset", str(data)]
    argv += ["--output_dir", str(out), "--max_steps", "1", "--use_cpu", "--per_device_train_batch_size", "4"]
    theirs = {"method": "lora", "dataset": str(data), "training": {"learning_rate": 0.01}}

    def user_run_appears(*args: Any) -> None:  # a `train --output_dir cmp/lora` made meanwhile, finished
        (out / "lora").mkdir()
        write_run_record(out / "lora", theirs, "finished")
        (out / "lora" / "adapter_model.safetensors").write_bytes(b"the user's adapter")

    with monkeypatch.context() as patch:
        patch.setattr(compare, "_warm_up", user_run_appears)
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--output_dir '{out / 'lora'}' already holds a different run" in err, err
    assert (out / "lora" / "adapter_model.safetensors").read_bytes() == b"the user's adapter"

    holders: list[subprocess.Popen[str]] = []

    def live_run_appears(*args: Any) -> None:  # a live `train` holding the folder's lock meanwhile
        holders.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys; from deltatune.train.lock import RunLock; "
                    "RunLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()",
                    str(out2 / "lora"),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
        stdout = holders[0].stdout
        assert stdout is not None and stdout.readline().strip() == "held"  # waits for the state

    out2 = tmp_path / "cmp2"
    argv[argv.index(str(out))] = str(out2)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(compare, "_warm_up", live_run_appears)
            assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"is in use by another deltatune run (pid {holders[0].pid}" in err, err
    finally:
        for holder in holders:
            holder.communicate("")
