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


def test_floor_dora_is_the_floor_with_twice_the_gemms_of_the_adapted_layers() -> None:
    """``floor-dora`` computes what the floor computes (same output, same input gradient) and issues one more
    matrix product forward and one more backward in each query/value Linear, nothing else."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.workloads import Settings, build_base, build_variant, make_inputs

    settings = Settings(model="tiny", batch=2, image_size=32, num_labels=3)
    base = build_base(settings)
    pixels, _ = make_inputs(settings)
    counts, grads = {}, {}
    for name in ("floor", "floor-dora"):
        variant = build_variant(name, base, settings)
        x = pixels.detach().requires_grad_(True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = variant.model(pixel_values=x).logits
            out.sum().backward()
        counts[name] = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
        grads[name] = (out.detach(), x.grad)
    torch.testing.assert_close(grads["floor-dora"][0], grads["floor"][0], rtol=0, atol=0)
    torch.testing.assert_close(grads["floor-dora"][1], grads["floor"][1])
    adapted = 2 * 2  # query and value in each of the tiny model's 2 layers
    assert counts["floor-dora"] - counts["floor"] == 2 * adapted


def test_excess_ratio_pairs_rounds() -> None:
    from benchmarks.report import excess_ratio

    base = {"median": 1.0, "rounds": [1.0, 2.0, 1.0]}
    a = {"median": 1.1, "rounds": [1.1, 2.2, 1.1]}
    b = {"median": 1.2, "rounds": [1.2, 2.4, 1.4]}
    assert excess_ratio(a, b, base) == pytest.approx(0.5)  # per round 0.5, 0.5, 0.25: the median
    assert excess_ratio({"median": 1.1}, {"median": 1.3}, {"median": 1.0}) == pytest.approx(1 / 3)


def test_fraction_interval_is_a_ratio_of_mean_excesses_with_a_bootstrap_interval() -> None:
    from benchmarks.excess import fraction_interval

    floor = [1.0, 2.0, 1.0, 1.5]
    ours = [1.1, 2.1, 1.05, 1.55]  # excess 0.1, 0.1, 0.05, 0.05: mean 0.075
    theirs = [1.3, 2.2, 1.2, 1.8]  # excess 0.3, 0.2, 0.2, 0.3: mean 0.25
    fraction, low, high = fraction_interval(ours, theirs, floor)
    assert fraction == pytest.approx(0.3)
    assert 1 / 6 <= low <= fraction <= high <= 0.5  # every resample lies between the extreme groups
    at_floor = fraction_interval(ours, floor, floor)  # peft never above the floor: no finite fraction
    assert at_floor[0] == math.inf


@pytest.mark.slow
def test_excess_benchmark_smoke() -> None:
    result = run.main(
        ["--quick", "--model", "tiny", "--workloads", "excess", "--methods", "lora,dora", "--threads", "1"]
    )
    for method in ("lora", "dora"):
        row = result["excess"][method]
        assert row["groups"] == 6 and len(row["times"]["floor"]) == 6
        assert row["dt_floor"] > 0 and row["peft_floor"] > 0 and len(row["interval"]) == 2
    assert (
        "above_bound_fraction" in result["excess"]["dora"]
        and "floor-dora" in result["excess"]["dora"]["times"]
    )
    assert "above_bound_fraction" not in result["excess"]["lora"]
