"""A run's files and screens say what was trained, and its saved adapter loads to the run's predictions: a new
head left out of modules_to_save is refused (F13), a random-backbone sub-run of compare says so in its card
and adapter_config (F21), ``--method lora --use_dora`` is named DoRA everywhere (F7) and ``compare`` runs a
method given twice once (F1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tiny import save_tiny_vit_dir, write_image_folder

from deltatune.cli import main
from deltatune.tasks.classifier import build_base_model, new_heads
from deltatune.tasks.image_classification import RunSpec, attach_adapter

CLASSES = {0: "bright", 1: "dark", 2: "red"}
FLAGS = [
    "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--use_cpu", "--disable_tqdm", "true",
    "--seed", "0", "--validation_split", "0.25", "--r", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny ViT with transformers' default 2-class head, one with a 3-class head, and 3 classes of images."""
    root = tmp_path_factory.mktemp("truth")
    return {
        "model": save_tiny_vit_dir(root / "model"),
        "model3": save_tiny_vit_dir(root / "model3", num_labels=3),
        "data": write_image_folder(root / "data", per_class=4),
    }


def train_argv(assets: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        assets["model"],
        "--dataset",
        assets["data"],
        "--output_dir",
        str(out),
        *FLAGS,
        *extra,
    ]


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deltatune: error:")]
    assert len(lines) == 1, lines
    return lines[0]


# ---- F13 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [(), ("--target_modules", "q_proj", "classifier")])
def test_a_new_head_left_out_of_modules_to_save_is_refused(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...]
) -> None:
    """Left out, the new head would stay random, frozen and unsaved: no loading code could reproduce the run."""
    out = tmp_path / "out"
    assert main(train_argv(assets, out, "--modules_to_save", *extra)) == 2
    error = one_error(capsys)
    assert "'classifier'" in error and "--modules_to_save classifier" in error, error
    assert not out.exists()  # refused before the run started


def test_a_checkpoint_head_of_the_right_size_may_stay_frozen(assets: dict[str, str]) -> None:
    """A head the checkpoint holds at the dataset's size loads as it was: leaving it out is legitimate."""
    spec = RunSpec(
        method="lora", model=assets["model3"], dataset=assets["data"], adapter_kwargs={"modules_to_save": []}
    )
    base, _ = build_base_model(assets["model3"], CLASSES, seed=0)
    assert new_heads(base) == ()
    model = attach_adapter(spec, base, 3, total_steps=4)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)
    fresh, _ = build_base_model(assets["model"], CLASSES, seed=0)
    assert new_heads(fresh) == ("classifier",)
    with pytest.raises(ValueError, match="newly initialised"):
        attach_adapter(spec, fresh, 3, total_steps=4)


# ---- F7 -----------------------------------------------------------------------------------------
def test_lora_with_use_dora_is_named_dora_everywhere(assets: dict[str, str]) -> None:
    """The name every output shows (console, metrics, card, compare rows, run record) is the spec's method."""
    from deltatune.cli.run_args import parse_run, run_spec

    common = ["--model", assets["model"], "--dataset", assets["data"], "--output_dir", "unused", "--use_cpu"]
    dora = run_spec(parse_run("train", [*common, "--method", "dora"]), "dora")
    for method in ("lora", "LoRA"):
        spec = run_spec(parse_run("train", [*common, "--method", method, "--use_dora"]), method)
        assert (spec.method, spec.name) == ("dora", "dora")
        assert spec.identity() == dora.identity()  # the same run as --method dora
    plain = RunSpec(method="dora", model="m", dataset="d", adapter_kwargs={"use_dora": False})
    assert plain.method == "lora"  # what trains is plain LoRA


def test_a_folder_recorded_as_lora_with_use_dora_is_still_the_same_run(
    assets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Records written before runs were named after what trains said ``lora`` with ``use_dora``: the same
    command finds its own run there (to resume), not "a different run"."""
    out = tmp_path / "run"
    argv = [*train_argv(assets, out, "--method", "lora", "--use_dora"), "--max_steps", "1"]
    assert main(argv) == 0
    record_path = out / "deltatune_run.json"
    record = json.loads(record_path.read_text())
    assert record["method"] == "dora" and "use_dora" not in record["adapter_kwargs"]
    record["method"], record["adapter_kwargs"]["use_dora"] = "lora", True  # as the earlier version wrote it
    record_path.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds this run, finished" in err and "different run" not in err, err


# ---- F21 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("library", ["deltatune", "peft"])
def test_a_random_backbone_run_says_so_and_its_card_code_reproduces_it(
    assets: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    library: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """adapter_config names no pretrained base; the card says random and its code rebuilds the run's backbone
    (seed 1, not the seed 0 the saved model was made with), giving deltatune's own predictions."""
    import torch
    from PIL import Image

    from deltatune.tasks.inference import load_trained

    run = Path(assets["model"]).parent / "random-run"
    if not run.exists():
        assert main(train_argv(assets, run, "--random_backbone", "--seed", "1")) == 0
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    card = (run / "README.md").read_text()
    title = next(line for line in card.splitlines() if line.startswith("# "))
    assert "random backbone" in title and "seed 1" in title and "base_model:" not in card, title
    code = card.split("## How to load")[1].split("```python\n")[1].split("```")[0]
    if library == "peft":
        code = code.replace("from deltatune import PeftModel", "from peft import PeftModel")
    monkeypatch.chdir(run.parent)  # the card names the base model as `model`
    namespace: dict[str, Any] = {}
    exec(code.replace("ADAPTER_DIR", str(run)), namespace)  # the card's own code
    trained = load_trained(str(run))
    image = Image.open(Path(assets["data"]) / "red" / "0.png").convert("RGB")
    pixels = trained.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = trained.model(pixel_values=pixels).logits
        theirs = namespace["model"].eval()(pixel_values=pixels).logits
    torch.testing.assert_close(theirs, ours)


def test_a_random_backbone_merge_card_names_the_random_backbone(
    assets: dict[str, str], tmp_path: Path
) -> None:
    """Merged, a random-backbone adapter's card says what it was merged into (its config names no base)."""
    run = Path(assets["model"]).parent / "random-run"
    if not run.exists():
        assert main(train_argv(assets, run, "--random_backbone", "--seed", "1")) == 0
    assert main(["merge", "--adapter", str(run), "--output", str(tmp_path / "m")]) == 0
    card = (tmp_path / "m" / "README.md").read_text()
    title = next(line for line in card.splitlines() if line.startswith("# "))
    assert "random backbone" in title and "seed 1" in title and "`?`" not in title, title


# ---- F1 -----------------------------------------------------------------------------------------
def test_compare_runs_a_method_or_value_given_twice_once(
    assets: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Each row maps to one run folder: repeats after normalising (names, 4 and 4.0, lora + use_dora = dora)
    run once, with a notice."""
    import argparse
    import dataclasses
    import logging

    from deltatune.cli.init_options import compare_variants, variant_dests
    from deltatune.cli.run_args import parse_run, run_spec
    from deltatune.tasks.compare import plan_runs

    def planned(*flags: str) -> list[str]:
        common = [
            "--model",
            assets["model"],
            "--dataset",
            assets["data"],
            "--output_dir",
            "unused",
            "--use_cpu",
        ]
        parsed = parse_run("compare", [*common, "--baselines", "random", *flags])
        o = parsed.options
        shared = dataclasses.replace(
            parsed,
            options=argparse.Namespace(**{k: v for k, v in vars(o).items() if k not in variant_dests()}),
        )
        runs = plan_runs(
            lambda m, **kw: run_spec(shared, m, strict=False, **kw),
            o.methods,
            o.baselines,
            lambda m: compare_variants(m, o),
        )
        return [spec.name for spec in runs]

    with caplog.at_level(logging.WARNING, logger="deltatune"):
        assert planned("--methods", "lora", "LoRA", "ia3") == [
            "lora",
            "ia3",
            "lora (random backbone)",
            "ia3 (random backbone)",
        ]
        assert planned("--methods", "lora", "--loraplus_lr_ratio", "4", "4.0") == [
            "lora loraplus=4",
            "lora loraplus=4 (random backbone)",
        ]
        assert planned("--methods", "lora", "dora", "--use_dora") == ["dora", "dora (random backbone)"]
    assert "given twice" in caplog.text
