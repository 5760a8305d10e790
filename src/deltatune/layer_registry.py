"""The layer kinds of a method: which adapter layer class wraps which module type (a mixin of
:class:`deltatune.layers.AdapterLayer`).

A method's layer class wraps the module types in its ``supported_layers``; a type whose adapter holds other
tensors (LoRA's ``nn.Embedding``: ``lora_embedding_A``) gets a sibling class, registered from its own module
with :meth:`LayerKinds.register_layer_kind`. The tuner asks :meth:`LayerKinds.layer_class_for` which class
wraps a module.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

__all__ = ["LayerKinds"]


class LayerKinds:
    """Class-level registry of a method's layer kinds (per class, inherited by subclasses)."""

    adapter_param_names: ClassVar[tuple[str, ...]] = ()
    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = ()

    @classmethod
    def register_layer_kind(cls, base_type: type[nn.Module], layer_cls: type[Any]) -> None:
        """Makes :meth:`layer_class_for` answer ``layer_cls`` for modules of ``base_type``: a method's layer
        kinds that hold other tensors (LoRA's ``nn.Embedding``: ``lora_embedding_A``) register this way from
        their own module. Subclasses inherit the registrations and may override them."""
        kinds = cls.__dict__.get("_layer_kinds")
        if kinds is None:
            kinds = {}
            setattr(cls, "_layer_kinds", kinds)  # noqa: B010  (a per-class table, not inherited by assignment)
        kinds[base_type] = layer_cls

    @classmethod
    def layer_class_for(cls, base_layer: nn.Module) -> type[Any]:
        """The class of this method that wraps ``base_layer``: a registered kind, else this class."""
        for klass in cls.__mro__:
            for base_type, layer_cls in klass.__dict__.get("_layer_kinds", {}).items():
                if isinstance(base_layer, base_type):
                    return layer_cls  # type: ignore[no-any-return]
        return cls

    @classmethod
    def layer_classes(cls) -> tuple[type[Any], ...]:
        """This class and every kind :meth:`layer_class_for` may return (for listings of tensor names)."""
        found: list[type[Any]] = [cls]
        for klass in cls.__mro__:
            for base_type, layer_cls in klass.__dict__.get("_layer_kinds", {}).items():
                if layer_cls not in found and issubclass(base_type, cls.supported_layers):
                    found.append(layer_cls)
        return tuple(found)

    @classmethod
    def all_adapter_param_names(cls) -> tuple[str, ...]:
        """The adapter tensor names of every layer class of this method."""
        return tuple(dict.fromkeys(n for c in cls.layer_classes() for n in c.adapter_param_names))
