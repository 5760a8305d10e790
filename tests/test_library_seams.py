"""The PEFT API as a ported script uses it, compared with peft on the same tiny model (the u-lib tester's
findings): what ``save_pretrained`` writes for a selection of adapters, ..."""

from __future__ import annotations

from pathlib import Path

import pytest
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
