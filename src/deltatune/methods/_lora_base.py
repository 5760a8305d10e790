"""What every LoRA layer kind shares (PEFT's ``LoraLayer``): frozen adapter tensors (MiCA's B) and the variant
protocol (:class:`LoraLayerBase`, over :mod:`._lora_variants`), with the variant tables of deltatune's kinds."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import TargetSpec
from ..layer_types import CONV_TYPES, Conv1D
from ..layers import RankedLayer
from ._lora_hotswap import LoraHotswapMixin
from ._lora_variants import VariantTable, layer_class, requested_variants, resolve_variant

__all__ = ["CONV_VARIANTS", "EMBEDDING_VARIANTS", "LINEAR_VARIANTS", "FrozenWeightsMixin", "LoraLayerBase"]


class FrozenWeightsMixin(RankedLayer):
    """PEFT's ``frozen_peft_weight_names``: per adapter, the tensor dicts (``"lora_B"``) that never train (MiCA's
    B): left out of :meth:`adapter_parameters`, so activating the adapter leaves them frozen."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        self._extra_per_adapter["frozen_peft_weight_names"] = self.frozen_peft_weight_names

    def freeze_weight(self, adapter_name: str, attr: str) -> None:
        """Freezes ``attr``'s tensors of ``adapter_name`` for good."""
        self.frozen_peft_weight_names[adapter_name] = (
            *self.frozen_peft_weight_names.get(adapter_name, ()),
            attr,
        )
        item = getattr(self, attr)[adapter_name]
        for p in item.parameters() if isinstance(item, nn.Module) else [item]:
            p.requires_grad_(False)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        params = super().adapter_parameters(adapter_name)
        frozen = self.frozen_peft_weight_names.get(adapter_name)
        if not frozen:
            return params
        skip = set()
        for attr in frozen:
            item = getattr(self, attr)[adapter_name]
            skip |= {id(p) for p in (item.parameters() if isinstance(item, nn.Module) else [item])}
        return [p for p in params if id(p) not in skip]


class LoraLayerBase(LoraHotswapMixin, FrozenWeightsMixin):
    """The base of every LoRA layer kind (PEFT's ``LoraLayer``) and its variant protocol: :attr:`lora_variants`
    lists the combinations of variant options (:mod:`._lora_variants`) the kind supports, each with the layer
    class that holds such adapters (None: the kind itself); :meth:`resolve_lora_variant` picks the one a config
    asks for, and every adapter is added through it: a layer of the kind given a variant's config becomes that
    variant's layer in place (its adapters kept, as a LoRA layer takes a DoRA adapter in PEFT), and a combination
    the kind lacks is refused with the ones it supports."""

    @property
    def lora_variants(self) -> VariantTable:
        """Sorted tuples of variant names → None or a zero-argument factory of the variant; plain LoRA only."""
        return {(): None}

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> Any:
        """The variant ``config`` asks for: for deltatune's kinds the layer class holding its adapters, None for
        the kind's own (plain LoRA, or an option the kind implements itself: BD-LoRA, MiCA).

        Raises:
            ValueError: for a combination this kind does not support (naming those it does), or a malformed
                :attr:`lora_variants` (unsorted keys, names no config field declares).
        """
        return resolve_variant(self.lora_variants, config, self._get_name())

    def add_adapter(self, adapter_name: str, target: TargetSpec) -> None:
        """Resolves the adapter's variant, becomes its layer class where that extends this one, then builds it.

        Raises:
            ValueError: for a variant this kind does not support, or one whose layer cannot hold this layer's
                adapters (another variant's layer).
        """
        try:
            variant = self.resolve_lora_variant(config=target.config)
        except ValueError as error:
            hint = supported_types_hint(target.config, type(self.base_layer))
            raise ValueError(f"{error}{hint}") from None
        if isinstance(variant, type) and not isinstance(self, variant):
            if issubclass(variant, type(self)) and hasattr(variant, "extend_layer"):
                variant.extend_layer(self)
            elif issubclass(variant, type(self)) and not self.adapter_names:
                # an empty layer becomes the variant's as if built as it
                fresh = variant(self.base_layer)
                self.__class__ = variant
                self.__dict__.update(fresh.__dict__)
            else:
                raise ValueError(
                    f"{target.module_name or self._get_name()} holds {type(self).__name__} adapters; a "
                    f"{variant.__name__} adapter cannot join them (use another module or another model)"
                )
        super().add_adapter(adapter_name, target)


#: The variants of LoRA on a Linear or Conv1D, and on a ConvNd (:attr:`LoraLayer.lora_variants`).
LINEAR_VARIANTS: VariantTable = {
    (): None,
    ("alora_invocation_tokens",): layer_class("deltatune.methods._alora_layer:ALoraLayer"),
    ("kasa_config",): layer_class("deltatune.methods._kasa_layer:KasaLayer"),
    ("mica",): None,
    ("use_bdlora",): None,
    ("use_dora",): layer_class("deltatune.methods._dora_layer:DoraLayer"),
}
CONV_VARIANTS: VariantTable = {
    (): None,
    ("use_dora",): layer_class("deltatune.methods._dora_layer:DoraLayer"),
}
EMBEDDING_VARIANTS: VariantTable = {
    (): None,
    ("mica",): None,
    ("use_dora",): layer_class("deltatune.methods._dora_layer:DoraEmbeddingLayer"),
}
#: deltatune's LoRA kinds: the module types each table applies to.
KIND_TABLES: tuple[tuple[tuple[type[nn.Module], ...], VariantTable], ...] = (
    ((nn.Linear, Conv1D), LINEAR_VARIANTS),
    (CONV_TYPES, CONV_VARIANTS),
    ((nn.Embedding,), EMBEDDING_VARIANTS),
)


def supported_types_hint(config: Any, base_type: type[nn.Module]) -> str:
    """For the variants ``config`` asks for, the module types deltatune's kinds support each on where
    ``base_type`` is not one of them (``"; use_bdlora supports Linear and Conv1D layers, not Embedding"``)."""
    hints = []
    for name in requested_variants(config):
        types = [
            t.__name__ for kinds, table in KIND_TABLES if any(name in key for key in table) for t in kinds
        ]
        if types and base_type.__name__ not in types:
            listed = " and ".join([", ".join(types[:-1]), types[-1]] if len(types) > 1 else types)
            hints.append(f"; {name} supports {listed} layers, not {base_type.__name__}")
    return "".join(hints)
