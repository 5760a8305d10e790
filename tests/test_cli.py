"""The ``deltatune`` command line end to end on tiny offline data: train (every method), predict, evaluate,
merge (checked against transformers' pipeline), compare, the offline default, and the usage errors."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import save_tiny_vit_dir

import deltatune.train.arguments as arguments_module
from deltatune import available_methods, get_method
from deltatune.cli import main
from deltatune.cli.run_args import parse_run, run_spec

CLASSES = ["bright", "dark", "red", "striped"]
FAST = [
    "--num_train_epochs", "2",
    "--per_device_train_batch_size", "8",
    "--gradient_accumulation_steps", "1",
    "--logging_steps", "2",
    "--use_cpu",
    "--disable_tqdm", "true",
    "--seed", "0",
    "--validation_split", "0.25",
]  # fmt: skip


def _image(kind: str, rng: np.random.Generator, mode: str) -> Image.Image:
    a = rng.integers(0, 60, (40, 40, 3)).astype(np.uint8)
    if kind == "bright":
        a += 150
    elif kind == "red":
        a[..., 0] += 180
    elif kind == "striped":
        a[::4] = 255
    image = Image.fromarray(a)
    return image.convert(mode) if mode != "RGB" else image


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny ViT directory and an image folder (4 classes × 8 images, in RGB, L, RGBA and P modes)."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny_vit_dir(root / "model")
    rng = np.random.default_rng(0)
    for kind in CLASSES:
        (root / "data" / kind).mkdir(parents=True)
        for i in range(8):
            _image(kind, rng, ("RGB", "L", "RGBA", "P")[i % 4]).save(root / "data" / kind / f"{i}.png")
    return {"root": str(root), "model": str(root / "model"), "data": str(root / "data")}


def train_cli(assets: dict[str, str], out: str, *extra: str) -> int:
    return main(
        ["train", "--model", assets["model"], "--dataset", assets["data"], "--output_dir", out, *FAST, *extra]
    )


@pytest.fixture(scope="module")
def lora_run(assets: dict[str, str]) -> str:
    out = os.path.join(assets["root"], "lora")
    assert train_cli(assets, out, "--method", "lora", "--r", "4") == 0
    return out


# ---- train --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", available_methods())
def test_train_every_method_writes_its_outputs(assets: dict[str, str], method: str) -> None:
    out = os.path.join(assets["root"], f"run-{method}")
    config_cls = get_method(method).config_cls
    has_rank = "r" in config_cls.__dataclass_fields__ or "r" in config_cls.FLAG_ALIASES
    assert train_cli(assets, out, "--method", method, *(["--r", "4"] if has_rank else [])) == 0
    files = set(os.listdir(out))
    expected = {"adapter_config.json", "adapter_model.safetensors", "labels.json", "preprocessor_config.json"}
    expected |= {"metrics.json", "training_curve.png", "README.md", "deltatune_run.json"}
    assert expected <= files
    metrics = json.loads(Path(out, "metrics.json").read_text())
    assert metrics["method"] == method and metrics["num_labels"] == 4
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["eval"]["eval_accuracy"] == metrics["accuracy"]
    assert 0 < metrics["trainable_params"] < metrics["all_params"]
    card = Path(out, "README.md").read_text()
    peft_type = get_method(method).peft_type
    assert peft_type in card and "How to load" in card and "PeftModel.from_pretrained" in card
    config = json.loads(Path(out, "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["modules_to_save"] == ["classifier"]
    labels = json.loads(Path(out, "labels.json").read_text())
    assert sorted(labels["label2id"]) == CLASSES
    if method == "adalora":
        assert "adalora_ranks.png" in files
        assert config["total_step"] == 6 and config["target_r"] == 4  # --r maps to AdaLoRA's target_r
        kept = [sum(v) for v in config["rank_pattern"].values()]
        assert sum(kept) == 4 * len(kept) and min(kept) < config["init_r"]


def test_offline_default_runs_without_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """``deltatune train`` with no model or dataset uses the bundled digits and backbone (shortened here)."""
    from deltatune.vision import offline_default_model_dir

    monkeypatch.chdir(tmp_path)
    argv = ["train", "--max_train_samples", "40", "--max_eval_samples", "40", "--num_train_epochs", "1"]
    assert main([*argv, "--disable_tqdm", "true"]) == 0
    err = capfd.readouterr().err
    # the expected head re-initialisation is one line, not transformers' LOAD REPORT table
    assert "new 10-class head: classifier initialised (not in the checkpoint, or of another size)" in err
    assert "LOAD REPORT" not in err and "incompatible" not in err
    assert "precision: fp32 (automatic: " in err
    out = tmp_path / f"{os.path.basename(offline_default_model_dir())}-lora"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "offline-default" and metrics["base_model"] == "deltatune/vit-glyphs-32"
    assert metrics["num_labels"] == 10 and metrics["num_train"] == 40
    assert metrics["precision"] == "fp32" or torch.cuda.is_available()


def test_load_report_filter_passes_anything_but_a_head() -> None:
    import logging

    from deltatune.tasks.classifier import _HeadOnlyLoadReport

    def record(keys: list[str]) -> logging.LogRecord:
        table = "\n".join(["Key | Status", "----+-------", *(f"{k} | MISMATCH" for k in keys)])
        return logging.LogRecord("t", logging.WARNING, "", 0, "ViT LOAD REPORT from: x\n" + table, None, None)

    report = _HeadOnlyLoadReport()
    assert report.filter(record(["classifier.weight", "classifier.bias"])) is False
    assert report.heads == {"classifier"}
    assert report.filter(record(["classifier.weight", "vit.layers.0.attention.q_proj.weight"])) is True
    assert report.filter(logging.LogRecord("t", logging.WARNING, "", 0, "other", None, None)) is True

    # the guide's base checkpoint: a pooler the classifier does not use, and no head at all (coloured)
    table = "\n".join(
        [
            "Key | Status",
            "pooler.dense.weight | \x1b[33mUNEXPECTED\x1b[0m",
            "pooler.dense.bias | \x1b[33mUNEXPECTED\x1b[0m",
            "classifier.weight | \x1b[31mMISSING\x1b[0m",
        ]
    )
    guide = _HeadOnlyLoadReport()
    message = "ViTForImageClassification LOAD REPORT from: google/vit-base-patch16-224-in21k\n" + table
    assert guide.filter(logging.LogRecord("t", logging.WARNING, "", 0, message, None, None)) is False
    assert guide.heads == {"classifier"} and guide.unused == ["pooler.dense"]
    # unused weights alone, or a backbone weight missing next to them, are not the expected case
    only_unused = message.rsplit("\n", 1)[0]
    assert guide.filter(logging.LogRecord("t", logging.WARNING, "", 0, only_unused, None, None)) is True
    missing = only_unused + "\nvit.layers.0.mlp.fc1.weight | MISSING"
    assert guide.filter(logging.LogRecord("t", logging.WARNING, "", 0, missing, None, None)) is True


# ---- predict / merge / evaluate -----------------------------------------------------------------
def test_predict_json_matches_merged_pipeline(
    lora_run: str, assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import pipeline

    capsys.readouterr()
    assert main(["predict", assets["data"], "--adapter", lora_run, "--json", "--top_k", "3"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 32
    for item in results:
        scores = [p["score"] for p in item["predictions"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        assert {p["label"] for p in item["predictions"]} <= set(CLASSES)

    merged = str(tmp_path / "merged")
    assert main(["merge", "--adapter", lora_run, "--output", merged]) == 0
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(merged))
    assert json.loads(Path(merged, "config.json").read_text())["id2label"]["0"] == CLASSES[0]
    classify = pipeline("image-classification", model=merged, device="cpu")
    for item in results[::3]:
        expected = item["predictions"]
        got = classify(item["image"], top_k=3)
        assert [g["label"] for g in got] == [e["label"] for e in expected]
        np.testing.assert_allclose([g["score"] for g in got], [e["score"] for e in expected], atol=1e-5)


def test_predict_prints_a_table(
    lora_run: str, assets: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    image = os.path.join(assets["data"], "red", "0.png")
    assert main(["predict", image, "--adapter", lora_run, "--top_k", "2"]) == 0
    out = capsys.readouterr().out
    assert "probability" in out and re.search(r"\b1 │ \w+ +│ +0\.\d{4}", out), out


def test_evaluate_reports_per_class_accuracy_and_confusion(
    lora_run: str, capsys: pytest.CaptureFixture[str]
) -> None:
    own = {n: Path(lora_run, n).read_bytes() for n in ("eval_results.json", "all_results.json")}
    assert main(["evaluate", "--adapter", lora_run]) == 0
    out = capsys.readouterr().out
    assert "the evaluation split of" in out and "as recorded in the adapter's run record" in out
    # the run's own results stay; this evaluation goes beside them
    assert {n: Path(lora_run, n).read_bytes() for n in own} == own
    written = os.path.join(lora_run, "evaluate")
    report = json.loads(Path(written, "eval_results.json").read_text())
    trained = json.loads(Path(lora_run, "metrics.json").read_text())
    assert report["eval_samples"] == trained["num_eval"] == 8
    assert report["eval_accuracy"] == trained["accuracy"]
    assert (
        json.loads(Path(written, "all_results.json").read_text())["eval_accuracy"] == report["eval_accuracy"]
    )
    assert set(report["per_class_accuracy"]) <= set(CLASSES)
    assert np.array(report["confusion_matrix"]).sum() == 8
    assert os.path.isfile(os.path.join(written, "confusion_matrix.png"))
    assert "accuracy" in out


# ---- compare ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_runs_methods_and_baselines(assets: dict[str, str], tmp_path: Path) -> None:
    out = str(tmp_path / "compare")
    argv = ["compare", "--methods", "lora", "loha", "--model", assets["model"], "--dataset", assets["data"]]
    assert main([*argv, "--output_dir", out, *FAST, "--num_train_epochs", "1"]) == 0
    rows = {r["name"]: r for r in json.loads(Path(out, "compare.json").read_text())}
    assert list(rows) == [
        "lora",
        "loha",
        "linear_probe",
        "full",
        "lora (random backbone)",
        "loha (random backbone)",
    ]
    assert rows["full"]["trainable_percent"] == 100.0
    assert rows["linear_probe"]["trainable_params"] == 32 * 4 + 4
    assert all(0 <= r["accuracy"] <= 1 and r["train_time_s"] > 0 for r in rows.values())
    table = Path(out, "compare.md").read_text()
    assert "| method | trainable params | % | accuracy | train time (s) | peak memory (MiB) |" in table
    assert os.path.getsize(os.path.join(out, "compare.png")) > 0


# ---- flags --------------------------------------------------------------------------------------
def test_help_lists_adapter_and_training_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help-all"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--method", "--init_r", "--module_dropout", "--target_modules", "--alpha", "--dropout"):
        assert flag in text
    for flag in (
        "--learning_rate",
        "--gradient_accumulation_steps",
        "--evaluation_strategy",
        "--push_to_hub",
    ):
        assert flag in text


def test_adapter_flags_map_to_each_method(assets: dict[str, str]) -> None:
    common = ["--model", assets["model"], "--dataset", assets["data"], "--output_dir", "unused", "--use_cpu"]
    lora = parse_run("train", [*common, "--method", "lora", "--alpha", "32", "--dropout", "0.05", "--r", "8"])
    assert run_spec(lora, "lora").adapter_kwargs == {"r": 8, "lora_alpha": 32.0, "lora_dropout": 0.05}
    loha = parse_run("train", [*common, "--method", "loha", "--alpha", "4", "--dropout", "0.1"])
    assert run_spec(loha, "loha").adapter_kwargs == {"alpha": 4.0, "module_dropout": 0.1}
    ada = parse_run("train", [*common, "--method", "adalora", "--r", "4", "--init_r", "6", "--tinit", "2"])
    assert run_spec(ada, "adalora").adapter_kwargs == {"target_r": 4, "init_r": 6, "tinit": 2}
    regex = parse_run("train", [*common, "--target_modules", ".*q_proj", "--modules_to_save"])
    assert run_spec(regex, "lora").adapter_kwargs == {"target_modules": ".*q_proj", "modules_to_save": []}
    guide = parse_run(
        "train",
        [*common, "--evaluation_strategy", "steps", "--save_strategy", "steps", "--learning_rate", "1e-3"],
    )
    assert (
        str(guide.training_args.eval_strategy.value) == "steps" and guide.training_args.learning_rate == 1e-3
    )
    assert guide.training_args.per_device_train_batch_size == 128  # the guide's defaults
    assert guide.training_args.remove_unused_columns is False and guide.training_args.label_names == [
        "labels"
    ]


# ---- errors -------------------------------------------------------------------------------------
def test_unknown_method_lists_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--method", "vera"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'vera'" in err and all(m in err for m in available_methods())


def test_unknown_flag_suggests_the_closest(
    assets: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--model", assets["model"], "--learning_rat", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "unknown option '--learning_rat'" in err and "--learning_rate" in err and "--help" in err
    assert main(["train", "--method", "lora", "--init_r", "6"]) == 2
    err = capsys.readouterr().err
    assert "--init_r is an option of adalora, not of lora" in err and "--lora_alpha" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "unknown command 'frobnicate'. Commands: train, " in capsys.readouterr().err


def test_output_dir_with_another_run_is_refused(
    lora_run: str, assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = str(tmp_path / "copy")
    shutil.copytree(lora_run, copy)
    assert train_cli(assets, copy, "--method", "loha") == 2
    err = capsys.readouterr().err
    assert "already holds a different run" in err and "--overwrite_output_dir" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert train_cli(assets, str(foreign)) == 2
    assert "files not written by deltatune" in capsys.readouterr().err
    assert (
        train_cli(assets, copy, "--method", "loha", "--num_train_epochs", "1", "--overwrite_output_dir") == 0
    )
    assert json.loads(Path(copy, "metrics.json").read_text())["method"] == "loha"
    assert not any(name == "checkpoint-6" for name in os.listdir(copy)), (
        "the old run's checkpoints are removed"
    )


def test_fp16_without_gpu_and_offline_push_fail_early(
    assets: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(arguments_module, "accelerator_name", lambda: None)
    assert train_cli(assets, str(tmp_path / "a"), "--fp16") == 2
    assert "fp16 mixed precision needs a GPU" in capsys.readouterr().err
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert train_cli(assets, str(tmp_path / "b"), "--push_to_hub") == 2
    assert "--push_to_hub needs the network" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_inference_commands_name_missing_inputs(
    lora_run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(tmp_path / "nope.png"), "--adapter", lora_run]) == 2
    assert "neither an image file nor a directory" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "m")]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err
