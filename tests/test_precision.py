"""Automatic precision and CPU threads: what ``--precision auto`` picks, that the pick really autocasts,
the overrides, and the clear errors."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import QUIET_CPU_ARGS, save_tiny_vit_dir, tiny_vit

import deltatune.train.arguments as arguments_module
import deltatune.train.precision as precision_module
from deltatune.cli.run_args import CommandError, parse_run, run_spec
from deltatune.tasks.image_classification import RunSpec, run_training
from deltatune.train import TrainingArguments
from deltatune.train.arguments import SMALL_MODEL_GFLOP, cpu_threads
from deltatune.train.precision import CPU_BF16_MIN_GFLOP, forward_gflop, resolve_precision


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No accelerator, whatever this machine has."""
    monkeypatch.setattr(precision_module, "accelerator_name", lambda: None)
    monkeypatch.setattr(arguments_module, "accelerator_name", lambda: None)
    return monkeypatch


def _args(tmp_path: Path, **kw: object) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), **{**QUIET_CPU_ARGS, **kw})


def test_auto_picks_bf16_on_a_bf16_cpu_for_a_big_model(cpu_only: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpu_only.setattr(precision_module, "cpu_bf16_support", lambda: "AMX")
    args = _args(tmp_path, use_cpu=False)
    reason = resolve_precision(args, "auto", gflop=CPU_BF16_MIN_GFLOP * 4)
    assert args.bf16 and not args.fp16 and args.use_cpu
    # what accelerate reads: without it the flag alone would not autocast
    assert args.mixed_precision == "bf16"
    assert (
        reason.startswith("bf16 mixed precision (automatic: ") and "AMX" in reason and "--no_bf16" in reason
    )


@pytest.mark.parametrize(
    ("support", "gflop", "expected"),
    [
        ("AMX", CPU_BF16_MIN_GFLOP / 10, "too small"),
        (None, 50.0, "no native bfloat16"),
        ("AMX", None, "could not"),
    ],
)
def test_auto_stays_fp32_where_bf16_would_not_pay(
    cpu_only: pytest.MonkeyPatch, tmp_path: Path, support: str | None, gflop: float | None, expected: str
) -> None:
    cpu_only.setattr(precision_module, "cpu_bf16_support", lambda: support)
    args = _args(tmp_path)
    reason = resolve_precision(args, "auto", gflop=gflop)
    assert not args.bf16 and not args.fp16 and args.mixed_precision == "no"
    assert reason.startswith("fp32 (automatic: ") and expected in reason


def test_explicit_choices_win_and_contradictions_fail(cpu_only: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpu_only.setattr(precision_module, "cpu_bf16_support", lambda: "AMX")
    args = _args(tmp_path)
    assert resolve_precision(args, "fp32", gflop=100.0) == "fp32 (requested)" and not args.bf16
    args = _args(tmp_path)
    assert resolve_precision(args, "bf16", gflop=0.001).startswith("bf16 mixed precision (requested)")
    assert args.bf16 and args.mixed_precision == "bf16"
    already = _args(tmp_path, bf16=True)
    assert resolve_precision(already, "auto", gflop=0.001) == "bf16 mixed precision (requested)"
    with pytest.raises(ValueError, match=r"--bf16 contradicts --precision fp32"):
        resolve_precision(_args(tmp_path, bf16=True), "fp32")
    with pytest.raises(ValueError, match=r"fp16 mixed precision needs a GPU"):
        resolve_precision(_args(tmp_path), "fp16")
    with pytest.raises(ValueError, match=r"precision='half' is not valid; choose one of 'auto', 'fp32'"):
        resolve_precision(_args(tmp_path), "half")


def test_accelerate_launch_precision_counts_as_a_choice(cpu_only: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``accelerate launch`` passes its config's mixed precision through the environment: it is kept and
    said, so a contradicting --precision fp32 fails instead of being logged while accelerate autocasts."""
    cpu_only.setattr(precision_module, "cpu_bf16_support", lambda: None)
    cpu_only.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = _args(tmp_path)
    assert args.mixed_precision == "bf16" and not args.bf16
    reason = resolve_precision(args, "auto", gflop=0.001)
    assert reason == "bf16 mixed precision (accelerate config (ACCELERATE_MIXED_PRECISION))" and args.bf16
    with pytest.raises(ValueError, match=r"--bf16 contradicts --precision fp32"):
        resolve_precision(_args(tmp_path), "fp32")
    cpu_only.delenv("ACCELERATE_MIXED_PRECISION")
    args = _args(tmp_path)
    assert resolve_precision(args, "fp32") == "fp32 (requested)" and args.mixed_precision == "no"


def test_forward_gflop_is_per_example() -> None:
    model = tiny_vit()
    one = forward_gflop(model, {"pixel_values": torch.randn(1, 3, 32, 32), "labels": torch.tensor([0])})
    four = forward_gflop(model, {"pixel_values": torch.randn(4, 3, 32, 32)})
    assert one is not None and four is not None and one > 0
    assert four == pytest.approx(one, rel=1e-6)
    assert model.training  # the mode is restored
    assert forward_gflop(model, {"not_an_input": torch.zeros(1)}) is None  # uncountable: no crash


def test_cpu_threads_follow_the_model_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = tiny_vit()
        with cpu_threads(model, None, True, gflop=SMALL_MODEL_GFLOP / 2) as n:
            assert n == 1
        assert torch.get_num_threads() == 2
        with cpu_threads(model, None, True, gflop=SMALL_MODEL_GFLOP * 20) as n:
            assert n == 2  # a model that gains from threads keeps them
        with cpu_threads(model, 2, True, gflop=SMALL_MODEL_GFLOP / 2) as n:
            assert n == 2  # --num_threads wins
    finally:
        torch.set_num_threads(previous)


def test_cpu_threads_blocks_of_two_threads_do_not_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block held by another thread is not this thread's outer block: each thread decides for itself,
    while a block nested in this thread keeps the outer block's choice."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    model = tiny_vit()
    inside, release = threading.Event(), threading.Event()

    def hold_a_block() -> None:
        with cpu_threads(model, 2, True, gflop=SMALL_MODEL_GFLOP / 2):
            inside.set()
            release.wait()

    other = threading.Thread(target=hold_a_block)
    other.start()
    try:
        assert inside.wait(60)
        with cpu_threads(model, None, True, gflop=SMALL_MODEL_GFLOP / 2) as n:
            assert n == 1, "the other thread's block is not an outer block of this one"
            with cpu_threads(model, None, True, gflop=SMALL_MODEL_GFLOP * 20) as inner:
                assert inner == 1, "a nested block keeps the outer block's choice"
    finally:
        release.set()
        other.join()
        torch.set_num_threads(previous)


def test_cli_precision_flags(tmp_path: Path) -> None:
    common = ["--output_dir", str(tmp_path / "o"), "--use_cpu"]
    assert parse_run("train", common).options.precision == "auto"
    assert parse_run("train", [*common, "--no_bf16"]).options.precision == "fp32"
    assert parse_run("train", [*common, "--precision", "bf16"]).options.precision == "bf16"
    with pytest.raises(CommandError, match=r"--bf16 contradicts --precision fp32"):
        parse_run("train", [*common, "--bf16", "--no_bf16"])
    assert (
        run_spec(parse_run("train", common), "lora").data_pipeline == "auto"
    )  # gpu on a GPU the CPU cannot feed, else fast
    standard = parse_run("train", [*common, "--data_pipeline", "standard"])
    assert run_spec(standard, "lora").data_pipeline == "standard"
    with pytest.raises(CommandError, match=r"invalid choice: 'fp8'\. Valid choices: auto, fp32, bf16, fp16"):
        parse_run("train", [*common, "--precision", "fp8"])


@pytest.fixture(scope="module")
def jpeg_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny ViT directory and a folder of 96 px JPEGs (2 classes × 6), so the draft decoding runs."""
    root = tmp_path_factory.mktemp("jpegs")
    save_tiny_vit_dir(root / "model", num_hidden_layers=1)
    rng = np.random.default_rng(0)
    for c, name in enumerate(["dark", "light"]):
        (root / "data" / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 60, (96, 96, 3)) + 150 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / "data" / name / f"{i}.jpg", quality=90)
    return {"model": str(root / "model"), "data": str(root / "data")}


def test_forced_bf16_run_really_autocasts(
    jpeg_assets: dict[str, str],
    cpu_only: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Setting the flag after TrainingArguments' __post_init__ must still reach accelerate's autocast."""
    seen: list[bool] = []

    def record(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        seen.append(torch.is_autocast_enabled("cpu") and output.dtype == torch.bfloat16)

    import deltatune.tasks.image_classification as recipe_module

    original = recipe_module.build_base_model

    def build(*a: object, **k: object) -> object:
        model, processor = original(*a, **k)  # type: ignore[arg-type]
        model.vit.layers[0].mlp.fc1.register_forward_hook(record)  # type: ignore[union-attr]
        return model, processor

    cpu_only.setattr(recipe_module, "build_base_model", build)
    spec = RunSpec(
        method="lora", model=jpeg_assets["model"], dataset=jpeg_assets["data"], validation_split=0.34
    )
    args = _args(
        tmp_path / "run", max_steps=2, per_device_train_batch_size=4, save_strategy="no", eval_strategy="no"
    )
    with caplog.at_level(logging.INFO, logger="deltatune"):
        result = run_training(spec, args, write_report=False, precision="bf16")
    assert result.metrics["precision"] == "bf16 mixed precision"
    assert result.trainer.accelerator.mixed_precision == "bf16"
    # seen[0] is the fp32 cost probe before training; then 2 training steps and the evaluation
    assert len(seen) >= 3 and all(seen[1:]), seen
    assert "precision: bf16 mixed precision (requested)" in caplog.text


def test_auto_on_a_tiny_model_trains_in_fp32(
    jpeg_assets: dict[str, str],
    cpu_only: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cpu_only.setattr(precision_module, "cpu_bf16_support", lambda: "AMX")
    spec = RunSpec(
        method="lora", model=jpeg_assets["model"], dataset=jpeg_assets["data"], validation_split=0.34
    )
    args = _args(
        tmp_path / "run", max_steps=2, per_device_train_batch_size=4, save_strategy="no", eval_strategy="no"
    )
    with caplog.at_level(logging.INFO, logger="deltatune"):
        result = run_training(spec, args, write_report=False)
    assert result.metrics["precision"] == "fp32"
    assert "too small for bf16 autocast to pay off" in caplog.text
    assert result.trainer.args.dataloader_pin_memory is False  # nothing to pin for on a CPU
