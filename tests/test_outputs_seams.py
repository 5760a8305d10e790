"""Nothing finished is lost to a report, and cards the ecosystem reads (issue 16, items 3, 4 and 10; issue 18,
items 4 and 5).

A name from the user's data (class folders, the dataset or model folder) never breaks a plot, the report or
a card: plots draw it as plain text, cards escape it and serialise their front matter with
``huggingface_hub``, and a plot or page that still fails is one warning after the adapter and the result
files are saved and the run is marked finished. ``compare`` goes on past a run whose report failed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image
from tiny import TINY_RUN_FLAGS, save_tiny_vit_dir, tiny_vit

import deltatune.tasks.plots as plots
import deltatune.tasks.report as report
from deltatune import LoraConfig, get_peft_model
from deltatune.cli import main
from deltatune.model_card import md_code, md_fence, md_text, update_model_card
from deltatune.tasks.cards import merged_model_card, model_card, write_merged_model_card
from deltatune.tasks.html_report import image_label, prediction_rows, render_html_report
from deltatune.tasks.results import EvalPredictions
from deltatune.vision.folder import ImageFolderDataset

#: Class folder names that used to reach matplotlib's mathtext or markup unescaped.
HOSTILE_NAMES = ["$x$", "$", "a: b", "two\nlines", "<b>markup</b>", "$\\frac{a}{$"]


def _image_folder(root: Path, names: list[str], per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (40, 40, 3)).astype(np.uint8) + 30 * k
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _parsed_card(path: Path) -> dict[str, Any]:
    """The card's front matter, read by PyYAML and by huggingface_hub (both must accept it)."""
    text = path.read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text[4 : text.index("\n---\n", 4)])
    assert isinstance(front, dict)
    assert ModelCard.load(path).data.to_dict() == front
    return front


# ---- plots: user names are plain text ------------------------------------------------------------
def test_every_plot_draws_hostile_names_as_written(tmp_path: Path) -> None:
    n = len(HOSTILE_NAMES)
    title = "lora on data $\\frac{$ (a local image folder)"
    with matplotlib.rc_context({"text.usetex": True}):  # a user's global TeX setting does not reach us
        plots.confusion_plot(np.eye(n, dtype=int) * 2, HOSTILE_NAMES, str(tmp_path / "c.png"), title=title)
        history = [
            {"loss": 1.0, "step": 1, "epoch": 1.0},
            {"eval_loss": 0.9, "eval_accuracy": 0.5, "step": 1},
        ]
        plots.training_curve(history, str(tmp_path / "t.png"), title=title)
        plots.rank_heatmap({"layers.0.$q$": 3, "layers.1.$": 2}, str(tmp_path / "r.png"), title=title)
        row = {"name": "$\\frac{", "kind": "adapter", "accuracy": 0.5, "trainable_percent": 1.0}
        plots.compare_chart([row], str(tmp_path / "cc.png"), title=title)
    assert sorted(os.listdir(tmp_path)) == ["c.png", "cc.png", "r.png", "t.png"]


def test_plot_texts_are_not_parsed_as_math(monkeypatch: pytest.MonkeyPatch) -> None:
    kept: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: kept.append(fig))
    plots.confusion_plot(np.eye(2, dtype=int), ["$x$", "y"], "unused.png")
    ticks = kept[0].axes[0].get_xticklabels()
    assert ticks[0].get_text() == "$x$" and ticks[0].get_parse_math() is False


# ---- a real run on hostile names, and a run whose report fails -----------------------------------
def _train(root: Path, data: Path, out: Path, *extra: str) -> int:
    model = root / "my model: v2"  # a model folder name YAML cannot hold unquoted
    if not model.exists():
        save_tiny_vit_dir(model)
    argv = ["train", "--model", str(model), "--dataset", str(data), "--output_dir", str(out)]
    return main([*argv, *TINY_RUN_FLAGS, "--validation_split", "0.5", *extra])


def _assert_finished(out: Path) -> None:
    assert json.loads((out / "deltatune_run.json").read_text())["status"] == "finished"
    for name in ("adapter_model.safetensors", "adapter_config.json", "labels.json", "eval_results.json"):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_a_run_on_hostile_names_writes_every_file_and_cards_that_parse(tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "data $\\frac{$\nlicense: evil", HOSTILE_NAMES)
    out = tmp_path / "run"
    assert _train(tmp_path, data, out, "--save_strategy", "epoch") == 0
    _assert_finished(out)
    for name in ("report.html", "training_curve.png", "confusion_matrix.png", "README.md", "metrics.json"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    assert "&lt;b&gt;markup&lt;/b&gt;" in page and "<b>markup</b>" not in page
    cards = [out / "README.md", *out.glob("checkpoint-*/README.md")]
    assert len(cards) >= 2  # the run's card and a checkpoint's
    for card in cards:
        front = _parsed_card(card)
        text = card.read_text()
        assert "base_model" not in front and "license" not in front  # a local folder has no Hub id
        shared = text.split("## Command", 1)[0]  # the command is quoted as typed (with its paths)
        assert str(tmp_path) not in shared, card  # no path of this machine, checkpoint cards included
        assert "my model: v2" in text
        prose = re.sub(r"^(`{3,})[^\n]*\n.*?^\1$", "", text, flags=re.M | re.S)
        assert not re.search(r"^license", prose, re.M)  # the folder's newline starts no line of its own
    assert _parsed_card(out / "README.md")["tags"] == ["deltatune", "peft", "image-classification", "lora"]
    assert (out / "README.md").read_text().startswith("---\n") and "# LoRA adapter for" in (
        out / "README.md"
    ).read_text()


@pytest.mark.slow
def test_a_failing_plot_or_page_is_one_warning_and_the_run_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("cannot draw\nthis")

    monkeypatch.setattr(report, "training_curve", broken)
    monkeypatch.setattr(report, "write_html_report", broken)
    data = _image_folder(tmp_path / "data", ["cat", "dog"])
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        assert _train(tmp_path, data, tmp_path / "run") == 0
    out = tmp_path / "run"
    _assert_finished(out)
    assert (out / "all_results.json").is_file() and (out / "confusion_matrix.png").is_file()
    assert (out / "README.md").is_file() and not (out / "report.html").exists()
    assert "report.html" not in (out / "README.md").read_text(), "the card points only to files written"
    warnings = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    assert warnings == [
        "could not write training_curve.png (ValueError: cannot draw this), report.html (ValueError: cannot "
        "draw this); the adapter and the result files are saved"
    ]
    assert "could not write training_curve.png" in (out / "train.log").read_text()


@pytest.mark.slow
def test_compare_goes_on_after_a_run_whose_report_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    original = report.write_html_report

    def first_fails(metrics: dict[str, Any], *args: Any, **kwargs: Any) -> str:
        calls.append(metrics["name"])
        if len(calls) == 1:
            raise RuntimeError("the first report fails")
        return original(metrics, *args, **kwargs)

    monkeypatch.setattr(report, "write_html_report", first_fails)
    save_tiny_vit_dir(tmp_path / "model")
    data = _image_folder(tmp_path / "data $\\frac{$", ["$x$", "b"], per_class=6)
    out = tmp_path / "compare"
    argv = ["compare", "--methods", "lora", "loha", "--baselines", "--model", str(tmp_path / "model")]
    argv += ["--dataset", str(data), "--output_dir", str(out), "--max_steps", "2", "--use_cpu"]
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        assert main([*argv, "--per_device_train_batch_size", "4", "--validation_split", "0.34"]) == 0
    assert calls == ["lora", "loha"]
    rows = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in rows] == ["lora", "loha"]
    assert (out / "compare.png").is_file()  # the dataset's "$" in the chart title is drawn as written
    assert not (out / "lora" / "report.html").exists() and (out / "loha" / "report.html").is_file()
    for run in ("lora", "loha"):
        _assert_finished(out / run)
    assert json.loads((out / "deltatune_run.json").read_text())["status"] == "finished"
    assert "could not write report.html (RuntimeError: the first report fails)" in caplog.text


# ---- cards as the ecosystem reads them ------------------------------------------------------------
def _metrics(**overrides: Any) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "name": "lora",
        "method": "lora",
        "kind": "adapter",
        "base_model": "my model: v2",
        "dataset": "/data/some where/x\nlicense: evil",
        "num_train": 10,
        "num_eval": 4,
        "num_labels": 2,
        "trainable_params": 10,
        "all_params": 100,
        "trainable_percent": 10.0,
        "eval": {"eval_accuracy": 0.5},
        "adapter_config_json": '{"target_modules": "```"}',
        "ranks": {"layers.0.a|b`c": 2},
        "command": "deltatune train --dataset 'a\n```\nlicense: evil'",
    }
    metrics.update(overrides)
    return metrics


def _write(tmp_path: Path, text: str, name: str = "README.md") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_run_card_keeps_user_strings_out_of_the_front_matter_and_markup(tmp_path: Path) -> None:
    card = model_card(_metrics())
    front = _parsed_card(_write(tmp_path, card))
    assert set(front) == {"library_name", "pipeline_tag", "tags"}  # no base_model for a non-Hub name
    body = card.split("\n---\n", 1)[1]
    assert body.startswith("# LoRA adapter for `my model: v2`")
    prose = re.sub(r"^(`{3,})[^\n]*\n.*?^\1$", "", body, flags=re.M | re.S)  # without the code blocks
    assert not re.search(r"^license", prose, re.M)  # the dataset's newline is gone from the text
    assert "````bash" in body  # the command (a newline and ``` in it) stays inside a longer fence
    assert "| ``layers.0.a\\|b`c`` | 2 |" in body  # a module name keeps its table cell whole
    hub = model_card(_metrics(base_model="google/vit-base-patch16-224-in21k", ranks=None))
    assert _parsed_card(_write(tmp_path, hub))["base_model"] == "google/vit-base-patch16-224-in21k"


def test_merged_card_from_an_adapter_config_that_tries_to_inject_a_key(tmp_path: Path) -> None:
    config = LoraConfig(target_modules=["query"])
    config.base_model_name_or_path = "google/vit\nlicense: evil"
    adapter = tmp_path / "my adapter: v2\nlicense: evil"
    adapter.mkdir()
    merged = tmp_path / "merged"
    merged.mkdir()
    write_merged_model_card(str(merged), str(adapter), {"default": config}, 3)
    front = _parsed_card(merged / "README.md")
    assert "license" not in front and "base_model" not in front
    assert front["tags"] == ["deltatune", "image-classification", "lora", "merged"]
    text = (merged / "README.md").read_text()
    assert "with a LoRA adapter merged in" in text and "`my adapter: v2 license: evil`" in text
    assert not re.search(r"^license:", text, re.M)
    info = {"base_model": "acme/vit", "method": "DoRA", "adapter": "x", "num_labels": 2}
    assert _parsed_card(_write(tmp_path, merged_model_card(info)))["base_model"] == "acme/vit"


def test_library_cards_name_no_machine_path_and_keep_an_existing_card(tmp_path: Path) -> None:
    folder = tmp_path / "my model: v2"
    tiny_vit().save_pretrained(folder)
    from transformers import ViTForImageClassification

    base = ViTForImageClassification.from_pretrained(folder)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path / "adapter")
    card = tmp_path / "adapter" / "README.md"
    front = _parsed_card(card)
    assert "base_model" not in front and str(tmp_path) not in card.read_text()
    assert "- Method: LoRA" in card.read_text() and "`my model: v2`" in card.read_text()
    config = LoraConfig(target_modules=["q"])
    config.base_model_name_or_path = "x\nlicense: evil"
    kept = _write(tmp_path, "---\nmeta: hello\n---\nMy card\n", "kept.md")
    (tmp_path / "kept").mkdir()
    kept.rename(tmp_path / "kept" / "README.md")
    update_model_card(tmp_path / "kept", config, "0")
    front = _parsed_card(tmp_path / "kept" / "README.md")
    assert front["meta"] == "hello" and "license" not in front and front["library_name"] == "peft"
    assert (tmp_path / "kept" / "README.md").read_text().endswith("---\nMy card\n")


def test_markdown_escapes() -> None:
    assert md_text("<b>x</b>|y\nz") == r"\<b\>x\</b\>\|y z"
    assert md_code("a`b") == "``a`b``" and md_code("`x") == "`` `x ``"
    assert md_code("a|b", in_table=True) == "`a\\|b`"
    assert md_fence("x ``` y", "bash") == ["````bash", "x ``` y", "````"]


# ---- report.html: images by path, readable on a phone --------------------------------------------
def _folder_rows(root: Path) -> ImageFolderDataset:
    files, labels = [], []
    for k, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            path = root / name / f"{i}.png"
            Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(path)
            files.append(path)
            labels.append(k)
    return ImageFolderDataset(files, labels, ["cat", "dog"])


def _predictions() -> EvalPredictions:
    return EvalPredictions(
        predicted=np.array([1, 0, 0, 1, 1, 0]),
        labels=np.array([0, 0, 0, 1, 1, 1]),
        confidence=np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.99], dtype=np.float32),
    )


def test_misclassified_images_are_labelled_by_their_relative_path(tmp_path: Path) -> None:
    rows = _folder_rows(tmp_path / "data")
    assert image_label(rows, 4, [str(tmp_path / "data")]) == "dog/1.png"
    assert image_label(rows.subset([5, 0]), 1, [str(tmp_path / "data")]) == "cat/0.png"
    assert image_label(rows, 0, []) == "0.png" and image_label([{"image": None}], 0) == "#0"
    metrics = {
        "name": "lora",
        "method": "lora",
        "kind": "adapter",
        "base_model": "m",
        "dataset": str(tmp_path / "data"),
        "trainable_params": 1,
        "trainable_percent": 1.0,
        "class_names": ["cat", "dog"],
    }
    page = render_html_report(metrics, str(tmp_path), _predictions(), rows, [str(tmp_path / "data")])
    captions = re.findall(r'<span class="path">([^<]*)</span>', page)
    assert captions == ["dog/2.png", "cat/0.png"]  # the most confident mistakes first


def test_mistakes_after_an_unreadable_image_are_labelled_by_the_row_they_came_from(tmp_path: Path) -> None:
    """Evaluation drops an unreadable image, so its predictions are one fewer than the rows: each mistake
    must still be shown with its own file, not its neighbour's."""
    rows = _folder_rows(tmp_path / "data")
    (tmp_path / "data" / "cat" / "1.png").write_bytes(b"not a png")  # row 1: dropped by the evaluation
    predictions = EvalPredictions(  # rows 0, 2, 3, 4, 5; wrong: row 2 (0.9) and row 5 (0.8)
        predicted=np.array([0, 1, 1, 1, 0]),
        labels=np.array([0, 0, 1, 1, 1]),
        confidence=np.array([0.5, 0.9, 0.5, 0.5, 0.8], dtype=np.float32),
    )
    assert prediction_rows(predictions, rows) == [0, 2, 3, 4, 5]
    metrics = {
        "name": "lora",
        "method": "lora",
        "kind": "adapter",
        "base_model": "m",
        "dataset": str(tmp_path / "data"),
        "trainable_params": 1,
        "trainable_percent": 1.0,
        "class_names": ["cat", "dog"],
    }
    page = render_html_report(metrics, str(tmp_path), predictions, rows, [str(tmp_path / "data")])
    assert re.findall(r'<span class="path">([^<]*)</span>', page) == ["cat/2.png", "dog/2.png"]
    shuffled = EvalPredictions(predictions.predicted, predictions.labels[::-1].copy(), predictions.confidence)
    assert prediction_rows(shuffled, rows) is None  # labels that do not line up: no image is attributed
    assert "are not shown" in render_html_report(metrics, str(tmp_path), shuffled, rows)


def test_report_has_no_horizontal_overflow_at_phone_width(tmp_path: Path) -> None:
    from browser import find_chromium, inspect_page

    if find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: install Debian's chromium (.ci/run does)")
        pytest.skip("no chromium installed (apt-get install chromium)")
    long = "a_very_long_class_name_without_any_space_" * 3
    names = [long, "dog"]
    rows = _folder_rows(tmp_path / "data")
    history = [{"loss": 1.0, "step": s, "epoch": s / 2} for s in range(1, 9)]
    history += [{"eval_loss": 0.9, "eval_accuracy": 0.5, "step": 8, "epoch": 4.0}]
    plots.training_curve(history, str(tmp_path / "training_curve.png"), title=long)
    plots.confusion_plot(np.array([[2, 1], [2, 1]]), names, str(tmp_path / "confusion_matrix.png"))
    metrics = {
        "name": "lora",
        "method": "lora",
        "kind": "adapter",
        "base_model": "org/" + long,
        "dataset": "/some/folder/" + long,
        "num_labels": 2,
        "num_train": 10,
        "num_eval": 6,
        "class_names": names,
        "trainable_params": 123456,
        "all_params": 1234567,
        "trainable_percent": 10.0,
        "train_time_s": 1.5,
        "precision": "fp32",
        "accuracy": 0.5,
        "eval": {"eval_loss": 0.7},
        "confusion_matrix": [[2, 1], [2, 1]],
        "per_class_accuracy": {long: 2 / 3, "dog": 1 / 3},
        "history": history,
        "command": "deltatune train --dataset /some/folder/" + long + " --output_dir " + long,
        "adapter_config_json": json.dumps({"target_modules": [long]}, indent=2),
    }
    page = tmp_path / "report.html"
    page.write_text(render_html_report(metrics, str(tmp_path), _predictions(), rows, [str(tmp_path)]))
    checks = ("window.innerWidth", "document.documentElement.scrollWidth", "document.images.length")
    seen = inspect_page(page, checks, width=390, mobile=True)
    assert seen.errors == []
    assert seen.values[checks[0]] == 390 and seen.values[checks[2]] >= 4
    assert seen.values[checks[1]] <= seen.values[checks[0]]  # nothing wider than the phone's screen
