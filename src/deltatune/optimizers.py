"""Optimisers built for adapters: LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large
Models"), PEFT's ``peft.optimizers.create_loraplus_optimizer``.

LoRA+ trains the second factor B of each low-rank update with a larger learning rate than A
(``lr * loraplus_lr_ratio``), since B starts at zero and the update's feature learning is bottlenecked by it.
The parameter groups are PEFT's, so the same model gets the same groups in both libraries:

- the ``lora_embedding_A``/``_B`` factors of an adapted ``nn.Embedding``: ``loraplus_lr_embedding``;
- B factors (``<prefix>B`` in the name, for the prefix of any registered method) and every 1-d trainable
  tensor (biases, LayerNorm weights, DoRA's magnitudes): ``lr * loraplus_lr_ratio``, with
  ``loraplus_weight_decay`` except for biases and what lives in a LayerNorm (no decay);
- everything else that trains (A factors, AdaLoRA's E, a trained head's weight): ``lr``.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from .layers import AdapterLayer
from .registry import available_methods, get_method

__all__ = ["create_loraplus_optimizer", "loraplus_parameter_groups"]

#: PEFT's default learning rate of the adapted embeddings' factors.
EMBEDDING_LR = 1e-6


def _no_layernorm_names(module: nn.Module, prefix: str = "") -> list[str]:
    """The parameter names of ``module`` that are not inside an ``nn.LayerNorm`` (transformers'
    ``get_parameter_names(model, ALL_LAYERNORM_LAYERS)``)."""
    names = [f"{prefix}{name}" for name in module._parameters]
    for child_name, child in module.named_children():
        if not isinstance(child, nn.LayerNorm):
            names += _no_layernorm_names(child, f"{prefix}{child_name}.")
    return names


def _holder(model: nn.Module, name: str) -> nn.Module | None:
    """The module two levels above a parameter (a layer's ``ParameterDict`` entry gives the layer)."""
    path = ".".join(name.split(".")[:-2])
    if not path:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def loraplus_parameter_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = EMBEDDING_LR,
    loraplus_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """LoRA+'s parameter groups of ``model``'s trainable parameters, in PEFT's order: A (``lr``), embedding
    factors (``loraplus_lr_embedding``), B with decay and B without decay (both ``lr * loraplus_lr_ratio``).
    Each group is ``{"params", "names", "lr", "weight_decay"}`` (the optimiser ignores ``names``)."""
    decayed = {n for n in _no_layernorm_names(model) if "bias" not in n}
    b_names = tuple(f"{get_method(m).prefix}B" for m in available_methods())
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {k: [] for k in ("a", "embedding", "b", "b_no_decay")}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        holder = _holder(model, name)
        embedding = isinstance(holder, AdapterLayer) and isinstance(holder.base_layer, nn.Embedding)
        if embedding and param.ndim > 1:
            groups["embedding"].append((name, param))
        elif any(b in name for b in b_names) or param.ndim == 1:
            groups["b" if name in decayed else "b_no_decay"].append((name, param))
        else:
            groups["a"].append((name, param))
    settings = {
        "a": (lr, loraplus_weight_decay),
        "embedding": (loraplus_lr_embedding, loraplus_weight_decay),
        "b": (lr * loraplus_lr_ratio, loraplus_weight_decay),
        "b_no_decay": (lr * loraplus_lr_ratio, 0.0),
    }
    return [
        {
            "params": [p for _, p in members],
            "names": [n for n, _ in members],
            "lr": settings[key][0],
            "weight_decay": settings[key][1],
        }
        for key, members in groups.items()
    ]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[Optimizer],
    lr: float,
    loraplus_lr_ratio: float,
    **kwargs: Any,
) -> Optimizer:
    """An ``optimizer_cls`` over ``model``'s trainable parameters in LoRA+'s groups (see
    :func:`loraplus_parameter_groups`); PEFT's ``create_loraplus_optimizer``, same arguments.

    Args:
        model: The adapted model (a ``PeftModel``, or any module holding adapter layers).
        optimizer_cls: The optimiser class, e.g. ``torch.optim.AdamW``.
        lr: The learning rate of the A factors (and the optimiser's default).
        loraplus_lr_ratio: The B factors' learning rate over ``lr``; the paper uses 2 to 16 (at least 1).
        **kwargs: Passed to ``optimizer_cls``, except ``loraplus_lr_embedding`` (the embedding factors'
            learning rate, default 1e-6) and ``loraplus_weight_decay`` (the groups' weight decay, default 0).

    Returns:
        The optimiser. An 8-bit bitsandbytes optimiser keeps embeddings in 32 bits, as in PEFT.
    """
    embedding_lr = kwargs.pop("loraplus_lr_embedding", EMBEDDING_LR)
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    groups = loraplus_parameter_groups(model, lr, loraplus_lr_ratio, embedding_lr, weight_decay)
    for group in groups:
        del group["names"]
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)  # type: ignore[call-arg]
    if optimizer_cls.__name__ in ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"):
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
