"""Nothing unsafe loaded, nothing lost: pickle payloads refused, atomic saves, fuzzed config loading."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import tiny_vit

from deltatune import LoraConfig, PeftConfig, PeftModel, get_peft_model
from deltatune.registry import available_methods, get_method
from deltatune.serialization import load_adapter_weights


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "adapter_model.bin", "wb") as fh:
        pickle.dump({"base_model.model.x.lora_A.weight": _Payload(str(marker))}, fh)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_adapter_weights(str(tmp_path))
    assert not marker.exists(), "the pickle payload ran"


def test_legacy_bin_with_plain_tensors_loads(tmp_path):
    model = get_peft_model(tiny_vit(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_vit(), str(tmp_path))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=x).logits, loaded(pixel_values=x).logits, atol=1e-6)


_SAVER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from deltatune import LoraConfig, get_peft_model
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    peft_model = get_peft_model(model, LoraConfig(r=256, target_modules=["0", "1"], init_lora_weights=False))
    print("ready", flush=True)
    while True:
        peft_model.save_pretrained(sys.argv[1])
    """
)


@pytest.mark.slow
def test_kill_during_save_leaves_a_loadable_adapter(tmp_path):
    """SIGKILL a process that saves in a loop; the directory always holds a complete adapter."""
    from torch import nn

    def base():
        return nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))

    torch.manual_seed(0)
    first = get_peft_model(base(), LoraConfig(r=256, target_modules=["0", "1"], init_lora_weights=False))
    first.save_pretrained(tmp_path)
    script = tmp_path.parent / "saver.py"
    script.write_text(_SAVER)
    for delay in (0.05, 0.2, 0.4):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
        for name in leftovers:  # a killed writer may leave its temp file; it is never the real file
            os.unlink(tmp_path / name)
        loaded = PeftModel.from_pretrained(base(), str(tmp_path))
        weight = loaded.base_model.model[0].lora_A["default"].weight
        assert weight.shape == (256, 1024) and torch.isfinite(weight).all()


def _json_values():
    return st.recursive(
        st.none() | st.booleans() | st.integers(-5, 5000) | st.floats(allow_nan=True) | st.text(max_size=8),
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
        ),
        max_leaves=6,
    )


@st.composite
def _config_dicts(draw):
    method = draw(st.sampled_from(available_methods()))
    cls = get_method(method).config_cls
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls)]
    keys = draw(st.lists(st.sampled_from(names) | st.text(max_size=6), max_size=6, unique=True))
    data = {k: draw(_json_values()) for k in keys}
    data["peft_type"] = draw(st.sampled_from([get_method(method).peft_type, "LORA", "BOGUS", 3, None]))
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_config_dicts())
def test_fuzzed_config_dicts_raise_only_clear_errors(data):
    try:
        config = PeftConfig.from_dict(json.loads(json.dumps(data)))
    except ValueError as err:
        assert str(err)
        return
    # whatever loads must serialise and load back to the same thing
    again = PeftConfig.from_dict(json.loads(config.to_json_string()))
    assert type(again) is type(config)
