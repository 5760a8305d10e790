"""Every method on real architectures, built from configs (no download): GPT-2, BERT, a Llama-style decoder,
CLIP's vision tower, ConvNeXt, a torchvision ResNet and a timm ViT.

For each (model, method) the method can adapt: ``get_peft_model`` with the targets people use for that
architecture, one training step, save, and cross-loading with ``peft`` both ways (our file in peft, peft's
file here) with a max abs output difference below 1e-5. The README's table of what each method adapts is
this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_config, make_peft_config, max_abs_diff
from method_fixtures import nonzero_init
from torch import nn

import deltatune

peft = pytest.importorskip("peft")
TOL = 1e-5


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    config.vocab_size, config.num_labels = 32, 3
    return BertForSequenceClassification(config)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    config.vocab_size = 32
    return LlamaForCausalLM(config)


def _clip_vision() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    return CLIPVisionModel(config)


def _convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(
        ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)
    )


def _resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3)


def _timm_vit() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=16,
        num_heads=2,
        num_classes=3,
    )


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, 32, (2, 6), generator=torch.Generator().manual_seed(1))}


def _pixels(size: int) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))}


def _image(size: int) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {"x": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))}


@dataclass(frozen=True)
class Architecture:
    """A real architecture: builder, inputs, and the targets per method (None: the method cannot adapt it)."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    targets: dict[str, list[str] | None]
    modules_to_save: list[str] | None = None


_LINEAR = ["lora", "dora", "adalora", "loha", "lokr"]


def _same(targets: list[str], methods: list[str] = _LINEAR) -> dict[str, list[str] | None]:
    return dict.fromkeys(methods, targets)


ARCHITECTURES: dict[str, Architecture] = {
    # GPT-2's attention and MLP are transformers Conv1D layers: LoRA, DoRA and AdaLoRA adapt them, LoHa and
    # LoKr do not (in peft either).
    "gpt2": Architecture(
        _gpt2, _ids, {**_same(["c_attn", "c_proj"], ["lora", "dora", "adalora"]), "loha": None, "lokr": None}
    ),
    "bert": Architecture(_bert, _ids, _same(["query", "value"]), ["classifier"]),
    "llama": Architecture(_llama, _ids, _same(["q_proj", "v_proj"])),
    "clip_vision": Architecture(_clip_vision, _pixels(16), _same(["q_proj", "v_proj"])),
    # ConvNeXt: the pointwise Linear layers for every method, plus the depthwise (grouped) convs for LoHa/LoKr.
    "convnext": Architecture(
        _convnext,
        _pixels(32),
        {
            **_same(["pwconv1", "pwconv2"], ["lora", "dora", "adalora"]),
            **_same(["dwconv", "pwconv1"], ["loha", "lokr"]),
        },
        ["classifier"],
    ),
    "resnet": Architecture(_resnet, _image(32), _same(["conv1", "conv2"]), ["fc"]),
    "timm_vit": Architecture(_timm_vit, _image(32), _same(["qkv", "fc1"]), ["head"]),
}
SLOW = {"resnet"}


def _cases() -> list[Any]:
    cases = []
    for arch, spec in ARCHITECTURES.items():
        for method in deltatune.available_methods():
            if spec.targets.get(method) is None:
                continue
            marks = [pytest.mark.slow] if arch in SLOW else []
            cases.append(pytest.param(arch, method, id=f"{arch}-{method}", marks=marks))
    return cases


def _output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs) if "x" not in inputs else model(inputs["x"])
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _build(arch: Architecture) -> nn.Module:
    torch.manual_seed(0)
    return arch.build().eval()


def _train_step(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """One SGD step on the adapter. In eval mode: batch-norm statistics (ResNet) are no adapter state, so they
    must not move, and dropout stays off."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing trains"
    optimizer = torch.optim.SGD(params, lr=0.5)
    _output(model, inputs).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _configs(arch: Architecture, method: str) -> tuple[Any, Any]:
    targets = arch.targets[method]
    assert targets is not None
    # Default init (the step makes the adapter non-zero), except AdaLoRA: its singular values start at 0 and its
    # vectors at N(0, 0.02²), so one step barely moves it; random factors at a small scale make it count.
    options: dict[str, Any] = {}
    if method == "adalora":
        options = {"total_step": 10, "init_lora_weights": False, "lora_alpha": 0.001}
    ours = make_config(method, targets, arch.modules_to_save, nonzero=False, **options)
    theirs = make_peft_config(method, targets, arch.modules_to_save, **options)
    if method != "adalora":  # make_peft_config asks for non-zero init; use peft's default, as ours
        for key in nonzero_init(method):
            setattr(theirs, key, getattr(ours, key))
    return ours, theirs


@pytest.mark.parametrize(("arch_name", "method"), _cases())
def test_train_save_and_cross_load_with_peft(arch_name: str, method: str, tmp_path: Path) -> None:
    arch = ARCHITECTURES[arch_name]
    inputs = arch.inputs()
    ours_config, peft_config = _configs(arch, method)
    base = _output(_build(arch), inputs)

    ours = deltatune.get_peft_model(_build(arch), ours_config)
    _train_step(ours, inputs)
    expected = _output(ours, inputs)
    assert max_abs_diff(expected, base) > 1e-5, "the trained adapter must change the output"
    ours.save_pretrained(tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(_build(arch), str(tmp_path / "ours")).eval()
    assert max_abs_diff(_output(in_peft, inputs), expected) < TOL
    again = deltatune.PeftModel.from_pretrained(_build(arch), tmp_path / "ours")
    assert max_abs_diff(_output(again, inputs), expected) < TOL

    theirs = peft.get_peft_model(_build(arch), peft_config)
    _train_step(theirs, inputs)
    reference = _output(theirs, inputs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    loaded = deltatune.PeftModel.from_pretrained(_build(arch), tmp_path / "peft")
    assert max_abs_diff(_output(loaded, inputs), reference) < TOL
