"""The tuner of the trainable-tokens method: the input embedding by default, and the output layer tied to
it when the model ties its embeddings (PEFT's ``TrainableTokensModel``)."""

from __future__ import annotations

from typing import Any

import torch

from ..config import TargetingConfig
from ..layers import AdapterLayer
from ..tuner import AdapterModel
from ._token_rows import TrainableTokensLayer, input_embedding, tied_embedding_names

__all__ = ["TrainableTokensLayer", "TrainableTokensModel"]


class TrainableTokensModel(AdapterModel):
    """Wraps the embedding (``target_modules``, default the input embedding) in trainable-tokens layers; a tied
    output layer follows the input embedding's layer."""

    def _fill_default_targets(self, config: TargetingConfig) -> None:
        found = input_embedding(self.model)
        config.target_modules = found[0] if found else "embed_tokens"

    def after_inject(self, adapter_name: str, config: TargetingConfig) -> None:
        """Ties the layers of the modules that share the input embedding's weight to its layer (replacing a
        layer of their own, when ``target_modules`` named them too)."""
        super().after_inject(adapter_name, config)
        found = input_embedding(self.model)
        source = found[1] if found else None
        tied = bool(getattr(getattr(self.model, "config", None), "tie_word_embeddings", False))
        if not isinstance(source, TrainableTokensLayer) or not tied:
            return
        for name in tied_embedding_names(self.model):
            module: Any = self.model.get_submodule(name)
            if isinstance(module, TrainableTokensLayer):
                if module.tied_adapter is source:
                    module.update_layer(adapter_name, [])
                    continue
                module = module.base_layer
            layer = TrainableTokensLayer(module, tied_to=source)
            for held in source.adapter_names:
                layer.update_layer(held, [])
            layer.active_adapters = list(source.active_adapters)
            self.model.set_submodule(name, layer)
            if name not in self.targeted_module_names:
                self.targeted_module_names.append(name)

    def export_layer_tensors(
        self, module_name: str, layer: AdapterLayer, adapter_name: str
    ) -> dict[str, torch.Tensor]:
        """A tied layer's rows too (they are the embedding layer's; PEFT's files hold them under both names)."""
        if isinstance(layer, TrainableTokensLayer) and layer.tied_adapter is not None:
            return AdapterLayer.export_tensors(layer, adapter_name)
        return layer.export_tensors(adapter_name)
