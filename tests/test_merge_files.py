"""What ``deltatune merge`` and a run leave on disk (issue 11, items 6 and 17): a merge is atomic (built aside,
swapped in; an interrupted or killed one leaves the previous model whole, and its leftovers are removed by
the next), an output in or around the adapter folder is refused, and every file honours the umask."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import transformers
from safetensors.torch import load_file, save_file
from tiny import save_tiny_vit_dir, tiny_train_argv, tiny_vit, write_image_folder

from deltatune.cli import main
from deltatune.train import DeltaTrainer, TrainingArguments


def train(root: Path, out: Path) -> None:
    assert main(tiny_train_argv(root, out)) == 0


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters of one base model with different weights and different label names."""
    root = tmp_path_factory.mktemp("merge")
    save_tiny_vit_dir(root / "model")
    write_image_folder(root / "data", per_class=6)
    first = root / "first"
    train(root, first)
    second = root / "second"
    shutil.copytree(first, second, ignore=shutil.ignore_patterns("checkpoint-*"))
    tensors = {k: v + 0.25 for k, v in load_file(second / "adapter_model.safetensors").items()}
    save_file(tensors, second / "adapter_model.safetensors")
    labels = json.loads((second / "labels.json").read_text())
    renamed = {k: f"new-{v}" for k, v in labels["id2label"].items()}
    (second / "labels.json").write_text(
        json.dumps({"id2label": renamed, "label2id": {v: int(k) for k, v in renamed.items()}})
    )
    return {"root": root, "first": first, "second": second}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


# ---- item 6 -------------------------------------------------------------------------------------
def test_interrupted_merge_overwrite_leaves_the_previous_model_whole(
    adapters: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapters["first"]), "--output", str(out)]) == 0
    before = snapshot(out)
    original = transformers.PreTrainedModel.save_pretrained

    def save_then_interrupt(self: Any, *args: Any, **kwargs: Any) -> Any:
        original(self, *args, **kwargs)  # config.json and the weights are written...
        raise KeyboardInterrupt  # ... and Ctrl-C comes before the processor and labels.json

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_interrupt)
    try:
        status = main(["merge", "--adapter", str(adapters["second"]), "--output", str(out), "--overwrite"])
    except KeyboardInterrupt:
        status = -1
    assert snapshot(out) == before, "the previous merged model must be left whole, not mixed with the new one"
    assert temporaries(tmp_path) == []
    assert status == 130
    monkeypatch.undo()
    assert main(["merge", "--adapter", str(adapters["second"]), "--output", str(out), "--overwrite"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert all(name.startswith("new-") for name in config["id2label"].values())


def test_merge_refuses_outputs_in_or_around_the_adapter_or_a_file(
    adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters["first"], adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    before = snapshot(adapter)
    (tmp_path / "file").write_text("x")
    cases = {
        str(adapter): "adapter folder",
        str(adapter / "merged"): "adapter folder",
        str(tmp_path): "contains the adapter",
        str(tmp_path / "file"): "is a file",
    }
    for output, expected in cases.items():
        assert main(["merge", "--adapter", str(adapter), "--output", output, "--overwrite"]) == 2, output
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
    assert snapshot(adapter) == before and (tmp_path / "file").read_text() == "x"


_SLOW_MERGE = """
import sys, time
import transformers
from deltatune.cli import main
from deltatune.train import DeltaTrainer, TrainingArguments
original = transformers.PreTrainedModel.save_pretrained
def slow(self, *args, **kwargs):
    original(self, *args, **kwargs)
    print("saved", flush=True)
    time.sleep(60)
transformers.PreTrainedModel.save_pretrained = slow
sys.exit(main(["merge", "--adapter", sys.argv[1], "--output", sys.argv[2], "--overwrite"]))
"""


@pytest.mark.slow
def test_killed_merge_leaves_the_previous_model_and_its_leftovers_are_removed(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapters["first"]), "--output", str(out)]) == 0
    before = snapshot(out)
    victim = subprocess.Popen(
        [sys.executable, "-c", _SLOW_MERGE, str(adapters["second"]), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert victim.stdout is not None
    deadline = time.monotonic() + 120
    while victim.stdout.readline().strip() != "saved" and time.monotonic() < deadline:
        assert victim.poll() is None, victim.communicate()[1][-2000:]
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert snapshot(out) == before, "a kill mid-merge must leave the previous merged model whole"
    assert temporaries(tmp_path), "the killed merge's build folder is left behind (it was killed)"
    assert main(["merge", "--adapter", str(adapters["second"]), "--output", str(out), "--overwrite"]) == 0
    assert temporaries(tmp_path) == [], "the next merge removes what the killed one left"
    assert snapshot(out) != before


# ---- item 17 ------------------------------------------------------------------------------------
def test_every_written_file_honours_the_umask(adapters: dict[str, Path], tmp_path: Path) -> None:
    previous = os.umask(0o002)
    try:
        run, merged = tmp_path / "run", tmp_path / "merged"
        train(adapters["root"], run)
        assert main(["merge", "--adapter", str(run), "--output", str(merged)]) == 0
        assert main(["evaluate", "--adapter", str(run)]) == 0
        full = tmp_path / "full"  # a baseline without adapter: the Trainer saves the whole model
        args = TrainingArguments(str(full), report_to="none", use_cpu=True)
        DeltaTrainer(tiny_vit(), args).save_model(str(full))
    finally:
        os.umask(previous)
    wrong = []
    for folder in (run, merged, full):
        for path in [folder, *folder.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            expected = 0o775 if path.is_dir() else 0o664
            if mode != expected:
                wrong.append(f"{path.relative_to(tmp_path)}: {oct(mode)} (expected {oct(expected)})")
    assert not wrong, wrong
    assert (merged / "model.safetensors").exists() and any(run.glob("checkpoint-*/optimizer.pt"))
    assert (full / "model.safetensors").exists()
