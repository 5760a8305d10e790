"""More than one process: ``torchrun --nproc_per_node 2`` (gloo, CPU) with ``DeltaTrainer`` for all four
methods. Each rank writes its adapter (tests/train_worker.py ``ddp`` mode); the ranks must agree exactly,
and equal a single-process run over the same global batch of 8 (dropout off), AdaLoRA's rank pattern
included. LoHa/LoKr with module_dropout > 0 must train under ``find_unused_parameters=False``, and a NaN
on one rank must stop every rank at the same step without a checkpoint of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

WORKER = Path(__file__).with_name("train_worker.py")
EQUAL = ["lora", "loha", "lokr", "adalora", "adalora_accum"]
DROPOUT = ["loha_dropout", "lokr_dropout"]
SCENARIOS = [*EQUAL, *DROPOUT, "lora_nan"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="torch.distributed with the gloo backend is not available",
    ),
]


def launch(command: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen[str]) -> None:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]


def load(directory: Path, rank: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    with open(directory / f"rank{rank}.json", encoding="utf-8") as fh:
        record = json.load(fh)
    return record, load_file(directory / f"rank{rank}.safetensors")


def torchrun() -> list[str]:
    found = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    command = [found] if found else [sys.executable, "-m", "torch.distributed.run"]
    return [*command, "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    two = launch([*torchrun(), str(WORKER), "ddp", str(root / "ddp")])
    one = launch([sys.executable, str(WORKER), "ddp", str(root / "single"), "--scenarios", *EQUAL])
    finish(two)
    finish(one)
    return root / "ddp", root / "single"


@pytest.mark.parametrize("scenario", EQUAL)
def test_two_processes_equal_one_over_the_same_global_batch(runs: tuple[Path, Path], scenario: str) -> None:
    ddp, single = runs
    (rec0, rank0), (rec1, rank1) = load(ddp / scenario, 0), load(ddp / scenario, 1)
    ref_rec, reference = load(single / scenario, 0)
    assert rec0["world_size"] == rec1["world_size"] == 2 and ref_rec["world_size"] == 1
    assert rec0["global_step"] == ref_rec["global_step"] == 8
    assert rank0.keys() == rank1.keys() == reference.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
        torch.testing.assert_close(rank0[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    assert rec0["rank_pattern"] == rec1["rank_pattern"] == ref_rec["rank_pattern"]
    if scenario.startswith("adalora"):
        assert any(not all(keep) for keep in rec0["rank_pattern"].values()), "AdaLoRA must have pruned"
    assert rec0["eval_loss"] == pytest.approx(ref_rec["eval_loss"], rel=1e-5)
    for step, loss in ref_rec["losses"].items():  # the logged loss is the mean over both processes
        assert rec0["losses"][step] == pytest.approx(loss, rel=1e-5), f"loss at step {step}"


@pytest.mark.parametrize("scenario", DROPOUT)
def test_module_dropout_trains_without_unused_parameters(runs: tuple[Path, Path], scenario: str) -> None:
    ddp, _ = runs
    (rec0, rank0), (rec1, rank1) = load(ddp / scenario, 0), load(ddp / scenario, 1)
    assert rec0["global_step"] == rec1["global_step"] == 8 and rec0["error_step"] is None
    for name in rank0:
        assert torch.isfinite(rank0[name]).all(), name
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"


def test_nan_on_one_rank_stops_every_rank(runs: tuple[Path, Path]) -> None:
    ddp, _ = runs
    (rec0, _), (rec1, _) = load(ddp / "lora_nan", 0), load(ddp / "lora_nan", 1)
    assert rec0["error_step"] == rec1["error_step"] == 3, "inf in rank 1's input at step 3"
    assert rec0["global_step"] == rec1["global_step"] == 3
    checkpoints = sorted(p.name for p in (ddp / "lora_nan" / "trainer").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"]
    good = load_file(ddp / "lora_nan" / "trainer" / "checkpoint-2" / "adapter_model.safetensors")
    assert good and all(torch.isfinite(t).all() for t in good.values())


def test_cli_under_torchrun_trains_once_and_writes_one_run(tmp_path: Path) -> None:
    """``torchrun -m deltatune train``: both processes train one adapter (half the steps of one process),
    rank 0 alone prints and writes the run's files; ``--rank`` stands in for ``--r``, which torchrun's own
    parser rejects as ambiguous."""
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    ViTForImageClassification(config).save_pretrained(tmp_path / "model")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    for k, name in enumerate(["dark", "grey", "bright"]):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(16):
            pixels = rng.integers(0, 60, (40, 40, 3)).astype(np.uint8) + 70 * k
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    out = tmp_path / "out"
    flags = ["--method", "adalora", "--rank", "4", "--model", str(tmp_path / "model")]
    flags += ["--dataset", str(tmp_path / "data"), "--output_dir", str(out), "--num_train_epochs", "2"]
    flags += ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--use_cpu"]
    flags += ["--disable_tqdm", "true", "--seed", "0", "--ddp_find_unused_parameters", "false"]
    proc = launch([*torchrun(), "-m", "deltatune", "train", *flags])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    assert output.count("deltatune train adalora") == 1, "only rank 0 prints"
    # 42 train images (48 minus a 10% split): 21 per process, 6 steps of 4 per epoch (one process: 11)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "adalora" and metrics["ranks"] and 0 <= metrics["accuracy"] <= 1
    assert (out / "adapter_model.safetensors").exists() and (out / "deltatune_run.json").exists()


#: `deltatune train` under torchrun where process 1 kills itself (SIGKILL) at its second optimiser step.
DYING_RANK = """
import os, signal, sys
from deltatune.train.trainer import DeltaTrainer
original = DeltaTrainer.training_step
def step(self, *args, **kwargs):
    if os.environ.get("RANK") == "1" and self.state.global_step == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
DeltaTrainer.training_step = step
from deltatune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_dying_process_is_said_in_train_log_and_only_process_0_logs(tmp_path: Path) -> None:
    """Process 1 dies mid-run: process 0 learns it from its next collective (gloo: connection reset) or from
    torchrun's SIGTERM; either way train.log ends saying how the run stopped. Under torchrun only process 0
    writes log lines to the console (they used to come twice)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import save_tiny_vit_dir, write_image_folder

    save_tiny_vit_dir(tmp_path / "model")
    write_image_folder(tmp_path / "data", per_class=8)
    script = tmp_path / "dying_rank.py"
    script.write_text(DYING_RANK)
    out = tmp_path / "out"
    flags = [
        "train",
        "--method",
        "lora",
        "--model",
        str(tmp_path / "model"),
        "--dataset",
        str(tmp_path / "data"),
    ]
    flags += ["--output_dir", str(out), "--num_train_epochs", "2", "--per_device_train_batch_size", "4"]
    flags += ["--use_cpu", "--disable_tqdm", "true", "--seed", "0", "--ddp_find_unused_parameters", "false"]
    proc = launch([*torchrun(), str(script), *flags])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, output[-4000:]
    assert output.count("[deltatune] loaded ") == 1, f"only process 0 logs: {output[-4000:]}"
    log = (out / "train.log").read_text(encoding="utf-8")
    stopped = [line for line in log.splitlines() if "the run stopped:" in line]
    assert stopped, log[-4000:]
    assert (
        "another process of this 2-process run stopped" in stopped[-1]
        or "torchrun stops every process" in (stopped[-1])
    ), stopped[-1]
