"""``deltatune merge``/``predict`` on what a user may hand them (the s-tester findings F2, F3, F16, F17, F19,
F20): merging into the base model's own folder is refused, the merged card describes the base actually used,
a corrupt ``metrics.json`` never blocks a merge, empty paths and a closed stdout are one-line errors, and a
PEFT-format adapter without ``labels.json`` works from its saved label maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny import save_tiny_vit_dir, tiny_trained_run

from deltatune.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (``root/run``) on ``root/model`` and ``root/data``."""
    return Path(tiny_trained_run(tmp_path_factory.mktemp("mergechecks"), per_class=6))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- F2 -----------------------------------------------------------------------------------------
def test_merge_refuses_the_base_model_folder_however_spelled(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = run.parent
    before = snapshot(root / "model")
    (tmp_path / "link").symlink_to(root / "model")
    monkeypatch.chdir(root)
    for output in ("model", "model/", "./model", str(root / "model"), str(tmp_path / "link")):
        assert main(["merge", "--adapter", str(run), "--output", output, "--overwrite"]) == 2, output
        err = capsys.readouterr().err
        assert "base model folder" in err and "another --output" in err, err
        assert len(err.strip().splitlines()) == 1, err
    other = tmp_path / "other"  # --model: its folder is protected too
    save_tiny_vit_dir(other, seed=1)
    argv = ["merge", "--adapter", str(run), "--model", str(other), "--output", str(other), "--overwrite"]
    assert main(argv) == 2 and "base model folder" in capsys.readouterr().err
    assert snapshot(root / "model") == before


# ---- F3 -----------------------------------------------------------------------------------------
def test_merged_card_names_the_base_used_and_claims_no_accuracy_for_another_base(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from huggingface_hub import ModelCard

    root = run.parent
    accuracy = f"{json.loads((run / 'metrics.json').read_text())['accuracy']:.4f}"
    monkeypatch.chdir(root)
    other = root / "model_seed1"
    save_tiny_vit_dir(other, seed=1)
    argv = ["merge", "--adapter", str(run), "--model", "model_seed1", "--output", str(tmp_path / "m1")]
    assert main(argv) == 0
    card = ModelCard.load(tmp_path / "m1" / "README.md")
    assert card.text.startswith("# `model_seed1` with a LoRA adapter merged in"), card.text[:200]
    assert accuracy not in card.text and "does not apply" in card.text
    assert "not the adapter's recorded base" in caplog.text
    caplog.clear()
    same = [
        "merge",
        "--adapter",
        str(run),
        "--model",
        str(root / "model") + "/",
        "--output",
        str(tmp_path / "m2"),
    ]
    assert main(same) == 0  # the recorded base, spelled otherwise: the run's accuracy applies
    text = ModelCard.load(tmp_path / "m2" / "README.md").text
    assert f": {accuracy}." in text and "does not apply" not in text
    assert "recorded base" not in caplog.text


# ---- F17 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["predict", "", "--adapter", "RUN"], "argument images"),
        (["merge", "--adapter", "RUN", "--output", ""], "argument --output"),
        (["predict", "x.png", "--adapter", ""], "argument --adapter"),
        (["evaluate", "--adapter", "RUN", "--output_dir", " "], "argument --output_dir"),
    ],
)
def test_an_empty_path_is_a_usage_error_naming_the_argument(
    argv: list[str],
    flag: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # an empty path meant the current folder: nothing here may be touched
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path) if a == "RUN" else a for a in argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"{flag}: an empty path was given" in err, err
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


# ---- F19 ----------------------------------------------------------------------------------------
def test_predict_into_a_closed_stdout_is_one_line(
    run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    image = next((run.parent / "data").rglob("*.png"))
    monkeypatch.setattr("sys.stdout", None)  # what Python gives a program started with `>&-`
    assert main(["predict", str(image), "--adapter", str(run), "--json"]) == 1
    err = capsys.readouterr().err
    assert (
        err.strip()
        == "deltatune: error: cannot write to standard output (it is closed); redirect it to a file"
    )


# ---- F16 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "ignored"),
    [
        ('{"accuracy": 1e999, "dataset": "data"}', "ignored accuracy inf"),
        ('{"accuracy": NaN, "dataset": 5}', "ignored accuracy nan"),
        ('{"accuracy": "high", "dataset": "data"}', "ignored accuracy 'high'"),
        ('{"accuracy": 0.5, "data', "is not valid JSON"),
    ],
)
def test_a_corrupt_metrics_json_never_blocks_the_merge_nor_reaches_the_card(
    run: Path, tmp_path: Path, text: str, ignored: str, caplog: pytest.LogCaptureFixture
) -> None:
    from huggingface_hub import ModelCard

    adapter = tmp_path / "adapter"
    shutil.copytree(run, adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    (adapter / "metrics.json").write_text(text)
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    card = ModelCard.load(tmp_path / "merged" / "README.md").text
    assert "accuracy" not in card.lower() and "nan" not in card and "inf" not in card, card
    warnings = [r.getMessage() for r in caplog.records if "metrics.json" in r.getMessage()]
    assert len([w for w in warnings if ignored in w]) == 1, warnings
    dataset_warnings = [w for w in warnings if "ignored dataset" in w]
    assert len(dataset_warnings) == (1 if '"dataset": 5' in text else 0), warnings  # "data" is a name (U4)
    assert (tmp_path / "merged" / "model.safetensors").is_file()


# ---- F20 ----------------------------------------------------------------------------------------
def test_an_adapter_without_labels_json_uses_the_base_label_map_or_label_i_or_says_what_is_missing(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoConfig

    adapter = tmp_path / "adapter"
    shutil.copytree(run, adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    labels = json.loads((adapter / "labels.json").read_text())
    (adapter / "labels.json").unlink()
    image = str(next((run.parent / "data").rglob("*.png")))
    # the recorded base's config names no labels: transformers' LABEL_i for the head's 3 outputs, said once
    assert main(["predict", image, "--adapter", str(adapter), "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert {p["label"] for p in predicted} == {"LABEL_0", "LABEL_1", "LABEL_2"}
    assert "the 3 classes are called LABEL_0..LABEL_2, as transformers calls them" in caplog.text
    named = tmp_path / "named"  # the same base, its config naming the 3 classes in the head's order
    shutil.copytree(run.parent / "model", named)
    config = AutoConfig.from_pretrained(named)
    config.id2label = {int(k): v for k, v in labels["id2label"].items()}
    config.label2id = labels["label2id"]
    config.save_pretrained(named)
    assert main(["predict", image, "--adapter", str(adapter), "--model", str(named), "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert {p["label"] for p in predicted} == set(labels["label2id"])
    assert "using the 3 class names of the base model's config" in caplog.text
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--model", str(named), "--output", str(merged)]) == 0
    assert json.loads((merged / "labels.json").read_text()) == labels
    config.id2label, config.label2id = {0: "a", 1: "b"}, {"a": 0, "b": 1}  # two names for a 3-way head
    config.save_pretrained(named)
    assert main(["predict", image, "--adapter", str(adapter), "--model", str(named)]) == 2
    assert "names 2 labels" in capsys.readouterr().err
