"""PEFT's API where deltatune accepted or recorded something else, compared with peft on the same tiny model
(the u-lib tester's L14, L16, L17): AdaLoRA's ``add_weighted_adapter`` is refused, a ``layers_to_transform``
that selects no layer is named in the error, and a task type's heads are recorded in the config."""

from __future__ import annotations

from typing import Any

import pytest
import torch
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
