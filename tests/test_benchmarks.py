"""Smoke runs of the benchmark harness (tiny shapes), so that the commands the README quotes keep working
and their results keep their meaning: the merged path counts the base's FLOPs exactly, both whole-run
recipes train to a reported accuracy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import e2e, evaluate_memory, run, vision_paths


@pytest.mark.slow
def test_adapter_benchmark_smoke() -> None:
    result = run.main(
        [
            "--quick",
            "--model",
            "tiny",
            "--workloads",
            "train,infer,merged",
            "--methods",
            "lora,lokr",
            "--threads",
            "1",
        ]
    )
    for name in ("floor", "deltatune/lora", "peft/lora", "deltatune/lokr", "peft/lokr"):
        assert result["train"][name]["median"] > 0
    assert result["infer"]["deltatune/lora:merged"]["median"] > 0
    for name in ("deltatune/lora", "peft/lora", "deltatune/lokr", "peft/lokr"):
        merged = result["merged"][name]
        assert merged["flops_ratio"] == pytest.approx(1.0, abs=1e-12)  # merged = the base's computation
        assert merged["overhead_bound"] >= 1.0 and merged["pairs"] == 6 and math.isfinite(merged["ratio"])


@pytest.mark.slow
def test_end_to_end_benchmark_smoke(tmp_path: Path) -> None:
    argv = [
        "--quick",
        "--data",
        str(tmp_path),
        "--train-images",
        "20",
        "--val-images",
        "10",
        "--image-size",
        "96",
    ]
    result = e2e.main([*argv, "--model-shape", "tiny", "--batch", "8", "--repeats", "1"])
    whole = result["whole_run"]
    for recipe in ("guide", "deltatune"):
        (only,) = whole["runs"][recipe]
        assert only["wall_s"] > only["train_runtime_s"] > 0 and 0.0 <= only["accuracy"] <= 1.0
    # a tiny model: bf16 would not pay (on a CPU without native bf16 it is not even considered)
    assert whole["runs"]["deltatune"][0]["precision"] == "fp32"
    reason = whole["runs"]["deltatune"][0]["precision_reason"]
    assert "too small" in reason or "no native bfloat16" in reason, reason
    assert result["data_path"]["speedup"]["all"] > 0


def test_vision_paths_and_evaluate_memory_smoke() -> None:
    medians = vision_paths.main(["--images", "3", "--size", "64", "--rounds", "1"])
    assert set(medians) == {
        "decode",
        "fast train",
        "resize",
        "standard train",
        "normalise",
        "crop + resize",
        "normalise one",
    }
    assert all(side > 0 for sides in medians.values() for side in sides.values())
    rows = evaluate_memory.main(["--images", "12"])  # one process per count: one count is the smoke test
    assert [r["images"] for r in rows] == [12] and all(r["peak_mb"] >= r["after_load_mb"] > 0 for r in rows)


@pytest.mark.slow
def test_gpu_benchmark_script_runs_on_the_cpu(tmp_path: Path) -> None:
    """``python -m benchmarks.gpu`` is prepared on the CPU before a GPU is lent: the same code on tiny shapes
    (steps in bf16 and fp16 with ops and issue times, and whole runs of the guide vs deltatune train)."""
    from benchmarks import gpu, ops

    # the guide's and deltatune's whole runs are what test_end_to_end_benchmark_smoke runs; the GPU data path
    # is this script's own
    argv = ["--quick", "--device", "cpu", "--parts", "step,e2e", "--methods", "lora", "--out", str(tmp_path)]
    report = gpu.main([*argv, "--runs", "deltatune-gpu"])
    for precision in ("bf16", "fp16"):
        rows = report["step"][precision]
        assert set(rows) == {"floor", "peft/lora", "deltatune/lora"}
        assert all(r["ms"] > 0 and r["ops"] > 0 and r["issue_ms"] > 0 for r in rows.values())
    runs = report["e2e"]["runs"]
    assert set(runs) == {"deltatune-gpu"}
    assert all(
        "error" not in r and 0.0 <= r["accuracy"] <= 1.0 and r["images_per_second"] > 0 for r in runs.values()
    )
    assert (tmp_path / "gpu_bench.md").read_text().count("| deltatune-gpu |") == 1
    table = ops.main(["--methods", "lora", "--precisions", "fp32", "--repeats", "2", "--warmup", "1"])
    assert table == 0
