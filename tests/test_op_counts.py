"""Operations issued per training step, deltatune against peft (the CPU proxy of GPU host cost: each ATen
call is a dispatch on the host and, on a GPU, usually a kernel launch). Counts, not times: deterministic.

The same measurement as ``python -m benchmarks.ops``: a tiny ViT at 32 px, batch 1, the PEFT guide's
adapter settings, one AdamW step, fp32 and bf16 autocast.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.ops import count_ops, saved_mib
from benchmarks.workloads import METHODS, Settings, build_base, build_variant, make_inputs, train_step

pytest.importorskip("peft")


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def counts(request: pytest.FixtureRequest) -> dict[str, dict[str, float]]:
    settings = Settings(model="tiny", batch=1, image_size=32, bf16=request.param == "bf16", threads=1)
    base = build_base(settings)
    pixels, labels = make_inputs(settings)
    out: dict[str, dict[str, float]] = {}
    for name in [f"{lib}/{m}" for m in METHODS for lib in ("peft", "deltatune")]:
        variant = build_variant(name, base, settings)
        for _ in range(2):
            train_step(variant, pixels, labels, settings)
        torch.manual_seed(0)  # the same module-dropout draws for both libraries
        out[name] = dict(count_ops(lambda v=variant: train_step(v, pixels, labels, settings), "cpu"))
        torch.manual_seed(0)
        out[name]["saved_mib"] = saved_mib(
            lambda v=variant: train_step(v, pixels, labels, settings), variant.model
        )
    return out


@pytest.mark.parametrize("method", METHODS)
def test_no_more_ops_or_saved_activations_than_peft(counts: dict[str, dict[str, float]], method: str) -> None:
    ours, theirs = counts[f"deltatune/{method}"], counts[f"peft/{method}"]
    assert ours["ops"] <= theirs["ops"], (ours, theirs)
    assert ours["copies"] <= theirs["copies"] * 1.05, (ours, theirs)  # casts and copies: within 5%
    # activations: no more than peft's, give or take a few r×r matrices (AdaLoRA's regulariser keeps its
    # Gram deviations, 4.5 KiB here; peft keeps other tiny tensors instead)
    assert ours["saved_mib"] <= theirs["saved_mib"] * 1.001 + 0.01, (ours, theirs)
