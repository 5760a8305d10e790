"""The PEFT API as a ported script uses it, compared with peft on the same tiny model (the u-lib tester's
findings): what ``save_pretrained`` writes for a selection of adapters, ..."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from tiny import tiny_vit

import deltatune as dt

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])
def test_save_pretrained_with_no_selected_adapters_saves_none(library: object, tmp_path: Path) -> None:
    model = library.get_peft_model(tiny_vit(), library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # type: ignore[attr-defined]
    model.add_adapter("other", library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # type: ignore[attr-defined]
    model.save_pretrained(tmp_path / "none", selected_adapters=[])
    assert not any(p.name.startswith("adapter_") for p in (tmp_path / "none").rglob("*"))
    model.save_pretrained(tmp_path / "one", selected_adapters=["other"])
    assert (tmp_path / "one" / "other" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "one" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("library", [dt, peft], ids=["deltatune", "peft"])
def test_checkpointing_on_before_wrapping_still_trains_the_adapters(library: object) -> None:
    """Reentrant checkpointing with a frozen patch embedding: without inputs that require grad, nothing inside a
    checkpointed block gets a gradient, so only the head would train (silently)."""
    model = tiny_vit()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    config = library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])  # type: ignore[attr-defined]
    wrapped = library.get_peft_model(model, config)  # type: ignore[attr-defined]
    wrapped.train()
    labels = torch.tensor([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # torch's "None of the inputs have requires_grad" is the failure itself
        wrapped(pixel_values=torch.randn(2, 3, 32, 32), labels=labels).loss.backward()
    lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    assert len(lora) == 8
    assert all(p.grad is not None for p in lora)
    assert all(
        p.grad.abs().sum() > 0 for n, p in wrapped.named_parameters() if "lora_B" in n
    )  # A's: B is zero
