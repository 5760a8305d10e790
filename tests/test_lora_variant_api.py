"""PEFT's LoRA-variant API on deltatune's layers: aLoRA's offset functions, DoRA's magnitude modules (``.weight``)
and the variant protocol (``lora_variants`` / ``resolve_lora_variant``), compared with peft where it has them."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.alora import (
    calculate_alora_offsets,
    get_alora_offsets_for_forward,
    get_alora_offsets_for_generate,
)

peft = pytest.importorskip("peft")
from peft.tuners.lora import variants as peft_variants  # noqa: E402


# ---- aLoRA's offsets --------------------------------------------------------------------------------
class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.linear = nn.Linear(8, 10)

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):  # type: ignore[no-untyped-def]
        return self.linear(self.embed(input_ids) if inputs_embeds is None else inputs_embeds)


ROWS = [[0, 1, 2, 3, 1, 2, 4], [1, 2, 0, 0, 0, 0, 0], [5, 5, 5, 5, 5, 1, 2], [0, 0, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize(
    "tokens, adapter_names",
    [
        ([1, 2], None),
        ([3], None),
        ([7, 8], None),
        ([1, 2], ["a", "b", "__base__", "a"]),
        ([1], ["b", "x", "a", "a"]),
    ],
)
def test_calculate_alora_offsets_as_peft(tokens: list[int], adapter_names: list[str] | None) -> None:
    ids = torch.tensor(ROWS)
    ours = {"a": dt.LoraConfig(alora_invocation_tokens=tokens, task_type="CAUSAL_LM"), "b": dt.LoraConfig()}
    theirs = {
        "a": peft.LoraConfig(alora_invocation_tokens=tokens, task_type="CAUSAL_LM"),
        "b": peft.LoraConfig(),
    }
    with warnings.catch_warnings(record=True) as ours_warned:
        warnings.simplefilter("always")
        got = calculate_alora_offsets(ours, "a", ids, adapter_names=adapter_names)
    with warnings.catch_warnings(record=True) as theirs_warned:
        warnings.simplefilter("always")
        want = peft_variants.calculate_alora_offsets(theirs, "a", ids, adapter_names=adapter_names)
    assert got == want
    assert [str(w.message) for w in ours_warned] == [str(w.message) for w in theirs_warned]
    assert calculate_alora_offsets(ours, "a", None) == []


def test_alora_offsets_for_forward_and_generate() -> None:
    torch.manual_seed(0)
    config = dt.LoraConfig(
        target_modules=["linear"], alora_invocation_tokens=[2], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = dt.get_peft_model(TinyLM(), config).eval()
    ids = torch.tensor([[0, 1, 2, 3], [0, 1, 1, 1]])
    kwargs = get_alora_offsets_for_forward(model, ids, foo=1)
    assert kwargs == {"foo": 1, "alora_offsets": [2, None]}
    with torch.no_grad():
        adapted = model(input_ids=ids)
        with model.disable_adapter():
            base = model(input_ids=ids)
    assert torch.equal(adapted[0, :2], base[0, :2]) and not torch.allclose(adapted[0, 2:], base[0, 2:])
    assert torch.equal(adapted[1], base[1])
    # an explicit value is kept; positional input_ids for generate; a 1-D prompt is one row
    assert get_alora_offsets_for_forward(model, ids, alora_offsets=[1, 1]) == {"alora_offsets": [1, 1]}
    assert get_alora_offsets_for_generate(model, ids) == {"alora_offsets": [2, None]}
    assert get_alora_offsets_for_generate(model, input_ids=ids[0])["alora_offsets"] == [2]
    with pytest.warns(UserWarning, match="only inputs_embeds are provided"):
        assert get_alora_offsets_for_forward(model, inputs_embeds=torch.ones(1, 4, 8)) == {
            "alora_offsets": None
        }
    with pytest.warns(UserWarning, match="during generate as input_ids are not available"):
        assert (
            get_alora_offsets_for_generate(model, inputs_embeds=torch.ones(1, 4, 8))["alora_offsets"] is None
        )
    # without an aLoRA adapter in the batch the arguments are left as they are
    model.add_adapter("plain", dt.LoraConfig(target_modules=["linear"]))
    model.set_adapter("plain")
    assert get_alora_offsets_for_forward(model, ids) == {}
    assert get_alora_offsets_for_forward(model, ids, adapter_names=["default", "__base__"]) == {
        "adapter_names": ["default", "__base__"],
        "alora_offsets": [2, None],
    }
