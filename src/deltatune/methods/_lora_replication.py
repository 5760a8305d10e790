"""LoRA's ``layer_replication`` (PEFT's ``replicate_layers``): the decoder stack is rebuilt from ranges of
its layers, e.g. ``[[0, 4], [2, 5]]`` turns layers 0…4 into 0, 1, 2, 3, 2, 3, 4. A repeated layer is a copy
whose parameters are the original's (no extra memory for the base), so each position gets LoRA adapters of
its own while the base weights stay shared. Applied before the targets are matched, so the adapters' keys
name the new positions (``model.layers.5.self_attn.q_proj.lora_A.weight``)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

__all__ = ["replicate_layers", "shared_copy"]


def shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are the original's own parameter objects."""
    clone = copy.deepcopy(module)
    for name, sub in module.named_modules():
        target = clone.get_submodule(name)
        for param_name, param in sub.named_parameters(recurse=False):
            target.register_parameter(param_name, param)
    return clone


def _layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(owner, attribute, list) of the decoder layers: ``…model.layers`` (Llama-like), ``encoder.layer``
    (BERT-like) or ``h`` (Falcon-like), found as PEFT finds them.

    Raises:
        ValueError: when the model has none of these.
    """
    while hasattr(model, "model") and isinstance(model.model, nn.Module):
        model = model.model
    bert = getattr(model, "bert", None)
    if isinstance(bert, nn.Module):
        model = bert
    encoder = getattr(model, "encoder", None)
    for owner, attr in ((model, "layers"), (encoder, "layer"), (model, "h")):
        layers = getattr(owner, attr, None) if owner is not None else None
        if isinstance(layers, nn.ModuleList):
            assert owner is not None
            return owner, attr, layers
    raise ValueError(
        "Could not locate the layers attribute in the model. Expected Llama, Bert or Falcon compatible "
        "architectures (layer_replication needs a module list at model.layers, encoder.layer or h)."
    )


def replicate_layers(model: nn.Module, layer_map: Any) -> None:
    """Rebuilds the layer list from the ``[start, end)`` ranges of ``layer_map`` (each layer a weight-sharing
    copy, its ``layer_idx`` attributes renumbered) and updates ``config.num_hidden_layers``.

    Raises:
        ValueError: for a model without a known layer list, or a range outside it.
    """
    owner, attr, layers = _layer_list(model)
    count = len(layers)
    new: list[nn.Module] = []
    for pair in layer_map:
        start, end = (int(v) for v in pair)
        if not 0 <= start < end <= count:
            raise ValueError(
                f"layer_replication range [{start}, {end}] is outside the model's {count} layers; each range is "
                f"[start, end) with 0 <= start < end <= {count}"
            )
        for i in range(start, end):
            clone = shared_copy(layers[i])
            for sub in clone.modules():
                if hasattr(sub, "layer_idx"):  # transformers numbers its caches by it
                    sub.__dict__["layer_idx"] = len(new)
            new.append(clone)
    setattr(owner, attr, nn.ModuleList(new))
    config = getattr(owner, "config", None) or getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new)
