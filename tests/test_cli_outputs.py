"""What a run leaves behind (issue 12, items 1, 4 and 5): the result files transformers' example scripts
write, files with no path of this machine (the bundled backbone's portable id, a hub model's id, the command
as typed), a model card whose loading code runs elsewhere, JSON only from ``compare``, and a card for the
merged model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from tiny import save_tiny_vit_dir, write_train_val_assets

from deltatune.cli import main
from deltatune.vision import offline_default_model_dir

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST = [
    "--num_train_epochs", "2",
    "--per_device_train_batch_size", "8",
    "--gradient_accumulation_steps", "1",
    "--logging_steps", "1",
    "--use_cpu",
    "--seed", "0",
]  # fmt: skip
CLASSES = ["bright", "dark", "red"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_train_val_assets(tmp_path_factory.mktemp("outputs"))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _example_run(assets: dict[str, str], out: Path, *extra: str) -> int:
    argv = ["train", "--model_name_or_path", assets["model"], "--train_dir", assets["train"]]
    return main([*argv, "--validation_dir", assets["val"], "--output_dir", str(out), *FAST, *extra])


# ---- item 1: the example script's result files ----------------------------------------------------
def test_example_script_run_writes_its_result_files(assets: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _example_run(assets, out, "--do_train", "--do_eval") == 0
    train = _json(out / "train_results.json")
    assert {"train_runtime", "train_loss", "train_samples_per_second", "epoch"} <= set(train)
    evaluation = _json(out / "eval_results.json")
    assert evaluation["eval_samples"] == 6  # --validation_dir's images, nothing carved from --train_dir
    assert {"eval_loss", "eval_accuracy", "epoch"} <= set(evaluation)
    assert sorted(evaluation["per_class_accuracy"]) == CLASSES
    assert sum(map(sum, evaluation["confusion_matrix"])) == 6
    combined = _json(out / "all_results.json")
    assert combined["train_loss"] == train["train_loss"]
    assert combined["eval_accuracy"] == evaluation["eval_accuracy"]
    state = _json(out / "trainer_state.json")
    assert (
        state["global_step"] == 6 and state["best_model_checkpoint"] == f"{out}/checkpoint-6"
    )  # 18 images, batch 8
    assert [h["eval_accuracy"] for h in state["log_history"] if "eval_accuracy" in h][-1] == evaluation[
        "eval_accuracy"
    ]
    assert _json(out / "metrics.json")["num_eval"] == 6


def test_do_train_false_only_evaluates(assets: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "eval-only"
    assert _example_run(assets, out, "--do_train", "false") == 0
    files = set(os.listdir(out))
    assert {"eval_results.json", "all_results.json", "report.html", "metrics.json"} <= files
    assert not files & {"train_results.json", "trainer_state.json", "adapter_model.safetensors", "README.md"}
    assert not any(name.startswith("checkpoint-") for name in files)
    assert _json(out / "metrics.json")["train_time_s"] == 0.0


def test_do_eval_false_never_evaluates(assets: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "train-only"
    assert _example_run(assets, out, "--do_eval", "false") == 0
    files = set(os.listdir(out))
    assert {"train_results.json", "trainer_state.json", "adapter_model.safetensors"} <= files
    assert "eval_results.json" not in files
    assert not any(k.startswith("eval_") for k in _json(out / "all_results.json"))
    assert not any("eval_loss" in h for h in _json(out / "trainer_state.json")["log_history"])


# ---- item 4: portable names ---------------------------------------------------------------------
def _code_block(markdown: str, after: str) -> str:
    section = markdown.split(after, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block after {after!r}"
    return match.group(1)


@pytest.mark.slow
def test_bundled_backbone_runs_are_portable_and_their_card_loads_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "machine-a"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["train", "--max_train_samples", "40", "--max_eval_samples", "20", "--max_steps", "2"]
    assert main([*argv, "--disable_tqdm", "true"]) == 0
    out = work / "vit-glyphs-32-lora"
    config = _json(out / "adapter_config.json")
    assert config["base_model_name_or_path"] == "deltatune/vit-glyphs-32"
    card = (out / "README.md").read_text()
    assert "base_model: deltatune/vit-glyphs-32\n" in card
    command = card.split("## Command", 1)[1]
    assert (
        "deltatune train --max_train_samples 40 --max_eval_samples 20 --max_steps 2 --disable_tqdm true"
        in command
    )
    machine_paths = (offline_default_model_dir(), sys.prefix, str(tmp_path), str(Path(SRC).parent))
    for name in (
        "adapter_config.json",
        "README.md",
        "metrics.json",
        "deltatune_run.json",
        "report.html",
        "eval_results.json",
        "all_results.json",
        "training_args.json",
    ):
        text = (out / name).read_text()
        assert not [p for p in machine_paths if p in text], name
    checkpoint_cards = list(out.glob("checkpoint-*/README.md"))
    assert checkpoint_cards  # they named the bundled backbone by its install path (issue 16, item 4)
    for card_path in checkpoint_cards:
        text = card_path.read_text()
        assert not [p for p in machine_paths if p in text], card_path
        assert ModelCard.load(card_path).data.base_model == "deltatune/vit-glyphs-32"

    moved = tmp_path / "machine-b" / "shared-adapter"  # another folder, another working directory
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("checkpoint-*"))
    snippet = _code_block(card, "## How to load").replace("ADAPTER_DIR", str(moved))
    snippet += (
        "\nimport torch\n"
        "pixels = image_processor(torch.zeros(3, 32, 32), return_tensors='pt')['pixel_values']\n"
        "print(tuple(model(pixel_values=pixels).logits.shape))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=moved.parent,
        env={**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "(1, 10)"


def _fake_hub_cache(root: Path) -> Path:
    """A Hugging Face cache holding ``acme/tiny-vit`` at one revision, as a download would leave it."""
    repo = root / "models--acme--tiny-vit"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    save_tiny_vit_dir(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot.name)
    return snapshot


@pytest.mark.slow
def test_hub_models_are_named_by_their_id_and_the_guide_code_loads_them(
    assets: dict[str, str], tmp_path: Path
) -> None:
    cache = tmp_path / "hf-cache"
    snapshot = _fake_hub_cache(cache)
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    for model, out in (("acme/tiny-vit", "by-id"), (str(snapshot), "by-path")):
        done = subprocess.run(
            [sys.executable, "-m", "deltatune", "train", "--model", model, "--train_dir", assets["train"],
             "--max_steps", "1", "--use_cpu", "--output_dir", out],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert _json(tmp_path / out / "adapter_config.json")["base_model_name_or_path"] == "acme/tiny-vit"
        assert "base_model: acme/tiny-vit\n" in (tmp_path / out / "README.md").read_text()
    guide = (  # the PEFT guide's loading code, from another working directory
        "from transformers import AutoModelForImageClassification\n"
        "from deltatune import PeftConfig, PeftModel\n"
        f"config = PeftConfig.from_pretrained({str(tmp_path / 'by-path')!r})\n"
        "model = AutoModelForImageClassification.from_pretrained(\n"
        "    config.base_model_name_or_path, num_labels=3, ignore_mismatched_sizes=True)\n"
        f"model = PeftModel.from_pretrained(model, {str(tmp_path / 'by-path')!r})\n"
        "print(config.base_model_name_or_path)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", guide],
        cwd=assets["root"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "acme/tiny-vit"


# ---- item 5: JSON only; a card for the merged model ----------------------------------------------
@pytest.mark.slow
def test_compare_writes_json_only(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "compare"
    argv = ["compare", "--methods", "lora", "--baselines", "full", "linear_probe", "--model", assets["model"]]
    argv += ["--train_dir", assets["train"], "--output_dir", str(out), *FAST, "--num_train_epochs", "1"]
    assert main(argv) == 0
    written = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    assert not [p for p in written if p.endswith((".bin", ".pkl", ".pt", ".pth"))], written
    assert (out / "full" / "training_args.json").is_file()
    assert json.loads((out / "full" / "training_args.json").read_text())["learning_rate"] > 0
    # the console (item 6): a title line per run, no output from the warm-up, no raw log dicts
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("deltatune compare · 3 runs · model ")
    assert [line for line in lines if line.startswith("[")] == [
        "[1/3] lora",
        "[2/3] linear_probe",
        "[3/3] full",
    ]
    assert (
        sum(
            line.split()
            == ["epoch", "loss", "eval", "loss", "accuracy", "top-5", "images/s", "elapsed", "ETA"]
            for line in lines
        )
        == 1
    )
    assert not [line for line in lines if "train_runtime" in line or line.startswith("{")]


def test_merged_model_gets_a_model_card(assets: dict[str, str], tmp_path: Path) -> None:
    run = tmp_path / "adapter"
    assert _example_run(assets, run, "--num_train_epochs", "1") == 0
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run), "--output", str(merged)]) == 0
    card = (merged / "README.md").read_text()
    meta = ModelCard.load(merged / "README.md").data.to_dict()
    # the base model is a local folder here: named by its folder's name in the text, no base_model key
    assert "base_model" not in meta and "`model`" in card and assets["root"] not in card
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-classification"
    assert meta["tags"] == ["deltatune", "image-classification", "lora", "merged"]
    assert "with a LoRA adapter merged in" in card  # the method's display name, not "LORA"
    accuracy = _json(run / "metrics.json")["accuracy"]
    assert f"{accuracy:.4f}" in card and "`adapter`" in card
    usage = _code_block(card, "## How to use")
    assert 'pipeline("image-classification", model="MODEL_DIR")' in usage
