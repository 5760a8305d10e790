"""LoRA's ``target_parameters`` (PEFT's ``ParamWrapper``) against peft as the oracle: mixture-of-experts
parameters (3-D, both layouts) on a small custom module, 2-D weights of a tiny Llama built from a config."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_llama
from torch import nn
from transformers import LlamaForCausalLM

import deltatune

peft = pytest.importorskip("peft")


class Experts(nn.Module):
    """E experts with stacked weights: (E, out, in), or (E, in, out) with ``is_transposed``."""

    def __init__(self, transposed: bool, experts: int = 3, dim: int = 8, hidden: int = 6) -> None:
        super().__init__()
        self.is_transposed = transposed
        up = (experts, dim, hidden) if transposed else (experts, hidden, dim)
        down = (experts, hidden, dim) if transposed else (experts, dim, hidden)
        self.gate_up_proj = nn.Parameter(torch.randn(up) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(down) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.gate_up_proj, self.down_proj
        if not self.is_transposed:
            up, down = up.transpose(1, 2), down.transpose(1, 2)
        return torch.relu(x @ up).matmul(down).sum(dim=0)


class Moe(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.experts = Experts(transposed)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.experts(self.inp(x)))


def moe(transposed: bool) -> Moe:
    torch.manual_seed(0)
    return Moe(transposed).eval()


def llama() -> LlamaForCausalLM:
    return tiny_llama(tie=False)


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
TOKENS = torch.tensor([[1, 2, 3, 4]])

CASES: dict[str, tuple[Any, torch.Tensor, dict[str, Any]]] = {
    "moe-both": (
        lambda: moe(False),
        X,
        {"target_modules": ["inp"], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
    ),
    "moe-transposed": (lambda: moe(True), X, {"target_parameters": ["gate_up_proj", "down_proj"], "r": 2}),
    "llama-2d": (
        llama,
        TOKENS,
        {"target_modules": [], "target_parameters": ["mlp.down_proj.weight", "self_attn.q_proj.weight"]},
    ),
}


def _out(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result = model(x)
    return getattr(result, "logits", result)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_peft_both_ways(case: str, tmp_path: Path) -> None:
    make, x, kwargs = CASES[case]
    kwargs = {"init_lora_weights": False, **kwargs}
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kwargs))
    ours = deltatune.get_peft_model(make(), deltatune.LoraConfig(**kwargs))
    trainable = {n: tuple(p.shape) for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n: tuple(p.shape) for n, p in theirs.named_parameters() if p.requires_grad}
    theirs.save_pretrained(tmp_path / "peft")
    loaded = deltatune.PeftModel.from_pretrained(make(), tmp_path / "peft")
    torch.testing.assert_close(_out(loaded, x), _out(theirs, x), atol=1e-5, rtol=1e-5)
    loaded.save_pretrained(tmp_path / "ours")
    keys = sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    expected = _out(loaded, x)
    torch.testing.assert_close(_out(back, x), expected, atol=1e-5, rtol=1e-5)
    with loaded.disable_adapter():
        torch.testing.assert_close(_out(loaded, x), _out(make(), x))
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(_out(merged, x), expected, atol=1e-5, rtol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_training_moves_only_the_adapter_and_the_parameter_stays_stored() -> None:
    model = deltatune.get_peft_model(
        moe(False), deltatune.LoraConfig(target_parameters=["experts.down_proj"])
    )
    stored = model.base_model.model.experts.base_layer.down_proj
    before = stored.detach().clone()
    start = _out(model, X)
    model.train()
    model(X).pow(2).sum().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert not torch.allclose(_out(model, X), start)
    assert torch.equal(stored, before) and stored.grad is None
    assert "down_proj" not in model.base_model.model.experts.base_layer.__dict__  # nothing left shadowing it


def test_second_adapter_shares_the_wrappers_and_must_target_the_same_parameters() -> None:
    targets = ["experts.gate_up_proj", "experts.down_proj"]
    model = deltatune.get_peft_model(moe(False), deltatune.LoraConfig(target_parameters=targets))
    model.add_adapter("b", deltatune.LoraConfig(target_parameters=list(reversed(targets))))
    outer = model.base_model.model.experts
    assert outer.parameter_name == "down_proj" and outer.next_layer.parameter_name == "gate_up_proj"
    assert outer.adapter_names == ["default", "b"] and not outer.lora_A["b"].weight.requires_grad
    with pytest.raises(ValueError, match="must target the same set of parameters"):
        model.add_adapter("c", deltatune.LoraConfig(target_parameters=["experts.down_proj"]))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lora_dropout": 0.1}, ValueError, "lora_dropout != 0"),
        ({"lora_bias": True}, ValueError, "lora_bias=True"),
        ({"target_parameters": "experts.down_proj"}, TypeError, "must be a list of strings"),
    ],
)
def test_peft_refusals(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        deltatune.get_peft_model(
            moe(False), deltatune.LoraConfig(**{"target_parameters": ["experts.down_proj"], **kwargs})
        )


def test_unmatched_parameters_warn_and_nothing_at_all_is_refused() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deltatune.get_peft_model(
            moe(False), deltatune.LoraConfig(target_modules=["inp"], target_parameters=["nope"])
        )
    assert any("no parameter was matched" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="matched nothing"):
        deltatune.get_peft_model(moe(False), deltatune.LoraConfig(target_parameters=["nope"]))
