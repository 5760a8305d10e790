"""Adapter folders from someone else (issue 11, items 8, 12-15): non-finite tensors and configs, malformed
label maps, custom code, resource exhaustion (huge ranks, catastrophic regexes, huge image sizes) and keys
that would overwrite frozen base weights are refused with a message naming the file -- before anything runs,
hangs or is allocated."""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import TINY_RUN_FLAGS, tiny_trained_run, tiny_vit

import deltatune
from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("untrusted")
    run = tiny_trained_run(root, per_class=6)
    return {"root": str(root), "run": run, "image": str(root / "data" / "red" / "0.png")}


def copy_run(trained: dict[str, str], tmp_path: Path) -> Path:
    target = tmp_path / "adapter"
    shutil.copytree(trained["run"], target, ignore=shutil.ignore_patterns("checkpoint-*"))
    return target


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("deltatune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- item 8 -------------------------------------------------------------------------------------
def test_non_finite_adapter_tensors_are_refused_by_name(
    trained: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = copy_run(trained, tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, adapter / "adapter_model.safetensors")
    for argv in (["predict", trained["image"]], ["merge", "--output", str(tmp_path / "merged")]):
        assert main([*argv, "--adapter", str(adapter)]) == 2
        line = error_line(capsys)
        assert key in line and "NaN" in line
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("field", ["lora_alpha", "image_std"])
def test_configs_that_make_outputs_non_finite_are_refused(
    trained: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    adapter = copy_run(trained, tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    for key in tensors:  # a non-zero delta, so that the scale matters
        tensors[key] = tensors[key] + 0.5
    save_file(tensors, adapter / "adapter_model.safetensors")
    if field == "lora_alpha":
        edit_json(adapter / "adapter_config.json", lora_alpha=1e38)
    else:
        edit_json(adapter / "preprocessor_config.json", image_std=[0, 0, 0])
    assert main(["predict", trained["image"], "--adapter", str(adapter), "--json"]) == 2
    line = error_line(capsys)
    assert (
        ("image_std" in line and "preprocessor_config.json" in line)
        if field == "image_std"
        else "NaN/inf" in line
    )
    assert capsys.readouterr().out == "", "nothing may be predicted"
    if field == "lora_alpha":
        assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 2
        assert "NaN" in error_line(capsys) and not (tmp_path / "merged").exists()


# ---- item 12 ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("id2label", "expected"),
    [
        ({"0": "bright", "1": "dark", "9": "red"}, "none missing"),
        ({"-1": "bright", "0": "dark", "1": "red"}, "none missing"),
        (["bright", "dark", "red"], "id2label: list"),
        ({"0": "bright", "1": "bright", "2": "red"}, "distinct"),
    ],
    ids=["gap", "negative", "list", "duplicate"],
)
def test_malformed_label_maps_are_refused_naming_labels_json(
    trained: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], id2label: Any, expected: str
) -> None:
    adapter = copy_run(trained, tmp_path)
    edit_json(adapter / "labels.json", id2label=id2label)
    for argv in (["predict", trained["image"]], ["merge", "--output", str(tmp_path / "merged")]):
        assert main([*argv, "--adapter", str(adapter)]) == 2
        line = error_line(capsys)
        assert "labels.json" in line and expected in line, line
    assert not (tmp_path / "merged").exists()


def test_silent_behaviours_are_said(
    trained: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from deltatune.vision import stratified_split

    with caplog.at_level(logging.WARNING, logger="deltatune"):
        train, _ = stratified_split([0, 0, 0, 0, 1, 2], 0.25, seed=0)
    assert "single image" in caplog.text and {4, 5} <= set(train)
    with pytest.raises(ValueError, match="single image"):  # one image per class: no class may leave training
        stratified_split([0, 1, 2], 0.25, seed=0)
    adapter = copy_run(trained, tmp_path)
    edit_json(adapter / "deltatune_run.json", random_backbone=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        assert main(["predict", trained["image"], "--adapter", str(adapter), "--json"]) == 0
    assert "randomly initialised backbone" in caplog.text
    config = deltatune.AdaLoraConfig(
        init_r=4, target_r=2, tinit=50, tfinal=10, total_step=100, target_modules=["q_proj"]
    )
    model = get_peft_model(tiny_vit(), config)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        model.base_model.prepare_training(20)
    assert "before pruning starts" in caplog.text and "unpruned" in caplog.text


# ---- item 13 ------------------------------------------------------------------------------------
_EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import ViTImageProcessor
class EvilProcessor(ViTImageProcessor):
    pass
"""


def test_custom_code_in_a_folder_never_runs_unless_asked(
    trained: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    adapter = copy_run(trained, tmp_path)
    marker = tmp_path / "ran"
    (adapter / "evil.py").write_text(_EVIL.format(marker=str(marker)))
    edit_json(
        adapter / "preprocessor_config.json",
        image_processor_type="EvilProcessor",
        auto_map={"AutoImageProcessor": "evil.EvilProcessor"},
    )
    answers: list[str] = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": answers.append(prompt) or "y")
    status = main(["predict", trained["image"], "--adapter", str(adapter), "--json"])
    assert not marker.exists(), "the folder's Python ran"
    assert not answers, "nobody may be asked whether to run a folder's code"
    assert status == 2
    assert "--trust_remote_code" in error_line(capsys)


# ---- item 14 ------------------------------------------------------------------------------------
def test_a_huge_rank_is_refused_before_anything_is_allocated(
    trained: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = copy_run(trained, tmp_path)
    edit_json(adapter / "adapter_config.json", r=200_000)
    built: list[int] = []
    original = deltatune.tuner.AdapterModel.__init__

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(deltatune.tuner.AdapterModel, "__init__", counting_init)
    with pytest.raises(ValueError, match=r"r=200000.*largest"):
        PeftModel.from_pretrained(tiny_vit(), str(adapter))
    assert not built, "the adapter layers must not be built (allocated) before the sizes are checked"


_REGEX_LOAD = """
import sys
from tiny import tiny_vit
from deltatune import PeftModel
try:
    PeftModel.from_pretrained(tiny_vit(), sys.argv[1])
except ValueError as err:
    print("refused:", err)
"""


def test_a_catastrophic_regex_fails_fast_instead_of_hanging(trained: dict[str, str], tmp_path: Path) -> None:
    adapter = copy_run(trained, tmp_path)
    edit_json(adapter / "adapter_config.json", target_modules="(.|.)*q")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-c", _REGEX_LOAD, str(adapter)],
            capture_output=True,
            text=True,
            timeout=600,  # a bound for a hang (backtracking for ever), not a speed test: a busy machine passes
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("matching target_modules='(.|.)*q' hung for 600 s")
    assert "refused:" in done.stdout and "target_modules" in done.stdout and "backtracking" in done.stdout, (
        done.stdout + done.stderr
    )


def test_huge_image_sizes_are_refused_before_allocating(
    trained: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = copy_run(trained, tmp_path)
    edit_json(adapter / "preprocessor_config.json", size={"height": 5000, "width": 5000})
    assert main(["predict", trained["image"], "--adapter", str(adapter), "--json"]) == 2
    line = error_line(capsys)
    assert "preprocessor_config.json" in line and "5000" in line
    model_dir = tmp_path / "model"
    shutil.copytree(Path(trained["root"]) / "model", model_dir)
    edit_json(model_dir / "preprocessor_config.json", size={"height": 30000, "width": 30000})
    argv = ["train", "--model", str(model_dir), "--dataset", str(Path(trained["root"]) / "data")]
    assert main([*argv, "--output_dir", str(tmp_path / "out"), *TINY_RUN_FLAGS]) == 2
    assert "30000" in error_line(capsys)


# ---- item 15 ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key", ["vit.layers.0.attention.q_proj.base_layer.weight", "classifier.original_module.weight"]
)
def test_keys_overwriting_frozen_base_weights_are_refused_unless_asked(tmp_path: Path, key: str) -> None:
    config = LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["classifier"], init_lora_weights=False
    )
    get_peft_model(tiny_vit(), config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    original = dict(tiny_vit().named_parameters())[
        key.replace("base_layer.", "").replace("original_module.", "")
    ]
    tensors[f"base_model.model.{key}"] = torch.full_like(original, 7.0)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="overwrite frozen base-model weights"):
        PeftModel.from_pretrained(tiny_vit(), str(tmp_path))
    skipped = PeftModel.from_pretrained(tiny_vit(), str(tmp_path), strict=False)
    assert not torch.equal(skipped.get_parameter(key), torch.full_like(original, 7.0))
    allowed = PeftModel.from_pretrained(tiny_vit(), str(tmp_path), allow_base_weights=True)
    assert torch.equal(allowed.get_parameter(key), torch.full_like(original, 7.0))


# ---- issue 16, item 5: bounded work on untrusted adapter files ---------------------------------------------
def test_a_huge_label_map_is_checked_in_linear_time(tmp_path: Path) -> None:
    """200,000 labels with one repeated name: the duplicate check was quadratic (``names.count`` per name,
    4e10 comparisons, hours); now one pass. The bound below is generous (a linear check takes well under a
    second even on a loaded machine), so a failure means the quadratic check is back, not a slow machine."""
    import time

    from deltatune.train import load_label_maps

    n = 200_000
    id2label = {str(i): f"class {i}" for i in range(n)}
    id2label[str(n - 1)] = "class 0"
    (tmp_path / "labels.json").write_text(json.dumps({"id2label": id2label}))
    start = time.process_time()
    with pytest.raises(ValueError, match=r"distinct, repeated: \['class 0'\]"):
        load_label_maps(tmp_path)
    assert time.process_time() - start < 30
    id2label[str(n - 1)] = f"class {n - 1}"
    (tmp_path / "labels.json").write_text(json.dumps({"id2label": id2label}))
    assert len(load_label_maps(tmp_path)[0]) == n


def test_a_label_map_that_does_not_fit_the_head_is_refused_first(tmp_path: Path) -> None:
    from deltatune.train import load_label_maps

    (tmp_path / "labels.json").write_text(json.dumps({"id2label": {str(i): "same" for i in range(1000)}}))
    with pytest.raises(
        ValueError, match="names 1000 labels but the model's classification head has 3 outputs"
    ):
        load_label_maps(tmp_path, num_labels=3)  # refused on its size, before the (also wrong) names


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_or_bool_adapter_tensors_are_refused_by_name(tmp_path: Path, dtype: torch.dtype) -> None:
    model = get_peft_model(tiny_vit(), LoraConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.ones_like(tensors[key], dtype=dtype)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"adapter tensor '{key}' has dtype {name}"):
        PeftModel.from_pretrained(tiny_vit(), tmp_path)
    with pytest.raises(ValueError, match=rf"adapter tensor '{key}' has dtype {name}"):
        model.load_adapter(tmp_path, "other")
    from deltatune.serialization import load_adapter_weights

    with pytest.raises(ValueError, match=rf"adapter tensor '{key}' has dtype {name}"):
        load_adapter_weights(
            str(tmp_path)
        )  # the reader under checkpoint restore and set_peft_model_state_dict


def test_labels_json_is_checked_against_the_saved_head_first(
    trained: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deltatune.train.checkpoint import saved_head_size

    adapter = copy_run(trained, tmp_path)
    assert saved_head_size(adapter) == 3, "read from the adapter file's header"
    edit_json(adapter / "labels.json", id2label={str(i): f"class {i}" for i in range(100_000)})
    for argv in (["predict", trained["image"]], ["merge", "--output", str(tmp_path / "merged")]):
        assert main([*argv, "--adapter", str(adapter)]) == 2
        line = error_line(capsys)
        assert "names 100000 labels but the model's classification head has 3 outputs" in line, line
