"""KappaTune's target selection (``peft.helpers.KappaTuneSelector`` / ``find_kappa_target_modules``): the same
choices as peft on the same weights, Linear layers and fused mixture-of-experts parameters."""

from __future__ import annotations

import pytest
import torch
from peft.helpers import KappaTuneSelector as PeftSelector
from peft.helpers import find_kappa_target_modules as peft_find
from torch import nn

from deltatune.helpers import KappaTuneSelector, find_kappa_target_modules


class _Moe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(2, 8, 12))
        self.down_proj = nn.Parameter(torch.randn(2, 12, 8))
        self.router = nn.Linear(8, 2)


def _model(moe: bool) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 4)]
    with torch.no_grad():
        layers[1].weight[:, 0] *= 50  # badly conditioned
    if moe:
        layers += [_Moe(), _Moe()]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("top_p", [0.2, 0.5, 1.0])
def test_same_choices_as_peft(moe: bool, top_p: float) -> None:
    model = _model(moe)
    assert find_kappa_target_modules(model, top_p=top_p) == peft_find(model, top_p=top_p, show_progress=False)
    ours, theirs = KappaTuneSelector(model), PeftSelector(model, show_progress=False)
    for kwargs in ({}, {"num_modules": 2}, {"threshold": 10.0}, {"top_p": top_p}):
        assert ours.get_best_targets(**kwargs) == theirs.get_best_targets(**kwargs), kwargs
        assert ours.get_best_target_parameters(**kwargs) == theirs.get_best_target_parameters(**kwargs), (
            kwargs
        )
    assert "1" not in ours.get_best_targets(top_p=0.5)  # the badly conditioned layer is not chosen


def test_large_matrices_are_skipped() -> None:
    model = _model(moe=True)
    small = KappaTuneSelector(model, max_dim_size_to_analyze=8)
    assert sorted(small.get_best_targets()) == ["0", "3", "4.router", "5.router"]  # no side over 8
    assert small.get_best_target_parameters() == []  # the experts' 12-wide weights
    assert small.get_best_targets() == PeftSelector(model, 8, show_progress=False).get_best_targets()
