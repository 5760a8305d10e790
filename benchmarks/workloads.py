"""Models, adapter configs and the step functions the benchmark times.

Every variant starts from the same randomly initialised ViT (one ``deepcopy`` of one base), gets the same
inputs and runs under the same thread count and precision:

- ``floor``: the frozen base doing forward + backward with gradients flowing to the input and computed
  for no weight (``requires_grad=False`` on every weight, ``pixel_values.requires_grad=True``); what an
  ideal adapter step costs, adapters aside.
- ``deltatune/<method>`` and ``peft/<method>``: forward, backward, optimiser step (AdaLoRA also runs
  ``update_and_allocate``) at the PEFT guide's settings.
- ``floor-tokens``: the floor with the gradient stopping at the patch embeddings' output (the tokens),
  i.e. without the patch-embedding conv's input gradient, which adapter runs never compute.
- ``floor-dora``: the floor plus, in every layer the DoRA workload adapts, the second full GEMM of the layer
  that PEFT's DoRA formula with dropout needs (``x Wᵀ`` and ``drop(x) Wᵀ`` forward, both input gradients
  backward), and nothing else: no adapter, no norm, no dropout. DoRA's lower bound under that formula, so its
  cost above this line is what an implementation adds.
- ``full``: full fine-tuning, as an optional reference.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

METHODS = ("lora", "loha", "lokr", "adalora", "dora", "ia3")
LIBRARIES = ("deltatune", "peft")

#: ViT shapes: ``small`` is ViT-Small/16 (the default), ``base`` ViT-Base/16, ``tiny`` for smoke tests.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256},
    "small": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
    },
    "base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
}

#: AdaLoRA's schedule for the benchmark: the guide's tfinal/deltaT, with tinit short and total_step long
#: enough that importance updates run on every measured step and pruning every deltaT steps.
ADALORA_SCHEDULE = {"tinit": 1, "tfinal": 1000, "deltaT": 10, "total_step": 100_000}


@dataclass
class Settings:
    """What every variant shares."""

    model: str = "small"
    batch: int = 8
    image_size: int = 224
    num_labels: int = 101
    device: str = "cpu"
    bf16: bool = False
    threads: int = 1
    seed: int = 0

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on the benchmark device when asked for, else nothing."""
        if self.bf16:
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type


def build_base(settings: Settings) -> nn.Module:
    """A randomly initialised ``ViTForImageClassification`` of the chosen shape (no download)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(settings.seed)
    config = ViTConfig(
        **SHAPES[settings.model],
        image_size=settings.image_size,
        patch_size=16,
        num_labels=settings.num_labels,
    )
    return ViTForImageClassification(config).to(settings.device).train()


def make_inputs(settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed pixel values (batch, 3, H, W) and labels (batch,)."""
    g = torch.Generator().manual_seed(settings.seed + 1)
    size = settings.image_size
    pixels = torch.randn(settings.batch, 3, size, size, generator=g)
    labels = torch.randint(0, settings.num_labels, (settings.batch,), generator=g)
    return pixels.to(settings.device), labels.to(settings.device)


def adapter_config(library: str, method: str) -> Any:
    """The PEFT guide's config for ``method`` (r=16 on query/value, classifier in ``modules_to_save``)."""
    if library == "deltatune":
        import deltatune as lib

        targets: list[str] = ["query", "value"]
    elif library == "peft":
        import peft as lib  # the oracle; transformers 5 spells the targets q_proj / v_proj

        targets = ["q_proj", "v_proj"]
    else:
        raise ValueError(f"unknown library {library!r}; choose one of {', '.join(LIBRARIES)}")
    common: dict[str, Any] = {"target_modules": targets, "modules_to_save": ["classifier"]}
    if method == "lora":
        return lib.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, bias="none", **common)
    if method == "loha":
        return lib.LoHaConfig(r=16, alpha=16, module_dropout=0.1, **common)
    if method == "lokr":
        return lib.LoKrConfig(r=16, alpha=16, module_dropout=0.1, **common)
    if method == "adalora":
        return lib.AdaLoraConfig(init_r=12, target_r=8, **ADALORA_SCHEDULE, **common)
    if method == "dora":  # LoRA's guide settings with DoRA on (PEFT's LoraConfig(use_dora=True))
        return lib.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, bias="none", use_dora=True, **common)
    if method == "ia3":  # not in the guide: IA³'s usual targets, k/v and the MLP's down-projection
        ia3 = {"target_modules": ["k_proj", "v_proj", "fc2"], "feedforward_modules": ["fc2"]}
        return lib.IA3Config(**ia3, modules_to_save=["classifier"])
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


#: The modules the adapter workloads target (transformers 5 names; 4.x said query / value).
TARGET_SUFFIXES = (".q_proj", ".v_proj", ".query", ".value")


class _SecondGemm(torch.autograd.Function):
    """``F.linear(x, weight, bias)``, computing the product twice forward and the input gradient twice
    backward (the extra results are dropped): the inherent GEMMs of DoRA with dropout, for ``floor-dora``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        torch.nn.functional.linear(x, weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        grad.matmul(weight)
        return grad.matmul(weight), None, None


def _with_second_gemm(model: nn.Module) -> int:
    """Makes every targeted Linear of ``model`` run :class:`_SecondGemm`; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(TARGET_SUFFIXES):
            module.forward = lambda x, m=module: _SecondGemm.apply(x, m.weight, m.bias)  # type: ignore[method-assign]
            count += 1
    return count


@dataclass
class Variant:
    """One thing being timed: a model, its optimiser and its step counter."""

    name: str
    library: str  # "floor", "floor-tokens", "full", "deltatune" or "peft"
    method: str | None
    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def build_variant(name: str, base: nn.Module, settings: Settings) -> Variant:
    """Builds ``floor``, ``full``, ``deltatune/<method>`` or ``peft/<method>`` from a copy of ``base``."""
    model = copy.deepcopy(base)
    if name == "floor":
        model.requires_grad_(False)
        return Variant(name, "floor", None, model)
    if name == "floor-dora":
        model.requires_grad_(False)
        if not _with_second_gemm(model):
            raise ValueError("floor-dora: the model has no query/value Linear to double")
        return Variant(name, "floor", None, model)
    if name == "floor-tokens":
        # As the floor, but the gradient stops at the patch embeddings' output: no input gradient for the
        # patch-embedding conv, which no adapter run computes either (on CPU it is ~10% of the floor).
        model.requires_grad_(False)
        patches = model.get_submodule("vit.embeddings.patch_embeddings")
        patches.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True))
        return Variant(name, "floor-tokens", None, model)
    if name == "full":
        model.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
        return Variant(name, "full", None, model, opt)
    library, _, method = name.partition("/")
    config = adapter_config(library, method)
    if library == "deltatune":
        import deltatune

        wrapped = deltatune.get_peft_model(model, config)
    else:
        import peft

        wrapped = peft.get_peft_model(model, config)
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    return Variant(name, library, method, wrapped, opt)


def train_step(v: Variant, pixels: torch.Tensor, labels: torch.Tensor, settings: Settings) -> None:
    """One training step of ``v`` (see the module docstring for what each variant does)."""
    if v.library == "floor":
        pixels = pixels.detach().requires_grad_(True)
    with settings.autocast():
        out = v.model(pixel_values=pixels, labels=labels)
    out.loss.backward()
    v.step += 1
    if v.optimizer is not None:
        v.optimizer.step()
        if v.method == "adalora":
            v.model.base_model.update_and_allocate(v.step)
        v.optimizer.zero_grad(set_to_none=True)


def infer_step(v: Variant, pixels: torch.Tensor, settings: Settings) -> None:
    """One inference forward (logits only) of ``v``."""
    with torch.inference_mode(), settings.autocast():
        v.model(pixel_values=pixels)


def set_merged(v: Variant, merged: bool) -> None:
    """Merges (or unmerges) the adapter of a deltatune/peft variant in place."""
    if v.library not in LIBRARIES:
        return
    if merged and not v.extra.get("merged"):
        v.model.merge_adapter()
    elif not merged and v.extra.get("merged"):
        v.model.unmerge_adapter()
    v.extra["merged"] = merged


def sync(settings: Settings) -> None:
    """Waits for queued device work (CUDA) so wall-clock timings are complete."""
    if settings.device_type == "cuda":
        torch.cuda.synchronize()
