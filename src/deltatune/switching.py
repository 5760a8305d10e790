"""Which adapters act and train: activating (one or several), freezing, enabling/disabling, merging and
unloading, across every adapter layer and ``modules_to_save`` wrapper of a model (PEFT's semantics).

:class:`AdapterSwitching` is a mixin of the tuner (:class:`deltatune.tuner.AdapterModel`); it needs the
tuner's ``model``, ``peft_config``, ``adapter_layers()`` and ``saved_module_wrappers()``.

Trainability, as in PEFT: the first adapter trains unless its config says ``inference_mode``; an added
adapter stays inactive and frozen; :meth:`~AdapterSwitching.set_adapter` makes the named adapters active
and trainable (frozen with ``inference_mode=True``); disabled adapter layers freeze their tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from .config import TargetingConfig
from .hooks import MethodHooks
from .layers import AdapterLayer
from .modules_to_save import AdapterLayerHolder, ModulesToSaveWrapper

__all__ = ["AdapterSwitching"]


class AdapterSwitching(MethodHooks):
    """Activation, trainability, enabling, merging and unloading (mixed into the tuner)."""

    model: nn.Module
    peft_config: dict[str, TargetingConfig]
    _active: list[str]

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:  # provided by the tuner
        raise NotImplementedError

    def saved_module_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:  # provided by the tuner
        raise NotImplementedError

    # ---- which adapters are active ------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        """The active adapters, in the order they were set."""
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter, or the list of them when several are active (PEFT's tuner attribute); code
        that needs one name uses :attr:`current_adapter`."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def current_adapter(self) -> str:
        """The (first) active adapter; ``""`` when none is."""
        return self._active[0] if self._active else ""

    def _check_names(self, names: Sequence[str], verb: str = "not found") -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter {unknown[0]} {verb}; adapters: {sorted(self.peft_config)}")

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Makes ``adapter_name`` (one name or a list) the active adapters, trainable unless ``inference_mode``;
        every other adapter is frozen. Several active adapters add up in every layer they share.

        Raises:
            ValueError: for an unknown name, or several active adapters holding copies of one
                ``modules_to_save`` module.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        for _, wrapper in self.saved_module_wrappers():  # raises before anything changes
            held = [n for n in names if n in wrapper.modules_to_save]
            if len(held) > 1:
                wrapper.set_adapter(held)
        for _, layer in self.adapter_layers():
            layer.set_adapter(names, inference_mode=inference_mode)
        for _, wrapper in self.saved_module_wrappers():
            wrapper.set_adapter(names, inference_mode=inference_mode)
        self._active = names
        if not inference_mode:
            for name in names:
                for p in self.extra_trainable_parameters(name):
                    p.requires_grad_(True)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turns gradients of the named adapters (active or not) on or off, ``modules_to_save`` copies too."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        for _, layer in self.adapter_layers():
            layer.set_requires_grad(names, requires_grad)
        for _, wrapper in self.saved_module_wrappers():
            for name in names:
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(requires_grad)

    def _mark_trainable(self) -> None:
        """Freezes the whole model, then activates the first adapter as its config says (trainable unless
        ``inference_mode``, with whatever :meth:`extra_trainable_parameters` adds)."""
        self.model.requires_grad_(False)
        self.set_adapter(self._active, inference_mode=bool(self.peft_config[self._active[0]].inference_mode))

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes ``adapter_name`` from every layer and wrapper (unmerging it first where merged). Deleting
        an active adapter leaves the other active ones, or else activates the first remaining adapter in
        sorted order (as PEFT does, with a warning).

        Raises:
            ValueError: for an unknown name.
        """
        self._check_names([adapter_name], "does not exist")
        del self.peft_config[adapter_name]
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        for _, wrapper in self.saved_module_wrappers():
            wrapper.delete_adapter(adapter_name)
        if adapter_name not in self._active:
            return
        remaining = [n for n in self._active if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]
            warnings.warn(
                f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {remaining[0]}.",
                stacklevel=3,
            )
        if remaining:
            self.set_adapter(remaining, inference_mode=bool(self.peft_config[remaining[0]].inference_mode))
        else:
            self._active = []

    # ---- enable / disable ---------------------------------------------------------------------
    def disable_adapter_layers(self) -> None:
        """Every adapter layer and ``modules_to_save`` wrapper gives the base output; adapter tensors freeze."""
        for _, layer in self.adapter_layers():
            layer.enable_adapters(False)
        for _, wrapper in self.saved_module_wrappers():
            wrapper.enable_adapters(False)

    def enable_adapter_layers(self, enabled: bool = True) -> None:
        """Re-enables every adapter layer; the active adapters train again unless their config says
        ``inference_mode`` (``enabled=False`` is :meth:`disable_adapter_layers`)."""
        if not enabled:
            self.disable_adapter_layers()
            return
        for _, layer in self.adapter_layers():
            layer.enable_adapters(True)
        for _, wrapper in self.saved_module_wrappers():
            wrapper.enable_adapters(True)
        if self._active:
            self.set_adapter(
                self._active, inference_mode=bool(self.peft_config[self._active[0]].inference_mode)
            )

    def adapter_layers_enabled(self) -> bool | str:
        """True when every adapter layer is enabled, False when none is, ``"irregular"`` otherwise."""
        states = {not layer.disable_adapters for _, layer in self.adapter_layers()}
        if len(states) > 1:
            return "irregular"
        return states.pop() if states else True

    # ---- merge / unload -----------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Folds adapters into the base weights in place: ``adapter_names``, or each layer's active ones."""
        for _, layer in self.adapter_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        """Restores every merged layer's base weight (warns, as PEFT does, when nothing was merged)."""
        merged = [layer for _, layer in self.adapter_layers() if layer.merged]
        if not merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=3)
        for layer in merged:
            layer.unmerge()

    def unload_and_optionally_merge(
        self,
        merge: bool,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        progressbar: bool = False,
    ) -> nn.Module:
        """Puts the base modules back (after merging ``adapter_names``, default the active adapters, when
        ``merge``) and returns the user's model. Nested adapter layers (an attention's ``out_proj``; a mixed
        model's layers of several methods, innermost merged first as in PEFT) go first."""
        layers = list(self.adapter_layers())[::-1]
        modules = dict(
            self.model.named_modules()
        )  # by object: in a mixed model "q.base_layer" is a nested layer
        iterator: Any = layers
        if progressbar:
            from tqdm.auto import tqdm

            iterator = tqdm(layers, desc="Unloading" + (" and merging" if merge else ""))
        for name, layer in iterator:
            if merge:
                names = [n for n in (adapter_names or self._active) if n not in layer.merged_adapters]
                if names:
                    layer.merge(safe_merge=safe_merge, adapter_names=names)
                layer.merged_adapters.clear()
            elif layer.merged:
                layer.unmerge()
            parent, _, leaf = name.rpartition(".")
            holder = modules.get(parent) if parent else None
            if isinstance(holder, AdapterLayerHolder) and leaf == holder.holder_attr:
                name = parent  # the holder goes too (PEFT's TrainableTokensWrapper)
                parent, _, leaf = name.rpartition(".")
            setattr(modules[parent], leaf, layer.unwrapped())
        for name, wrapper in list(self.saved_module_wrappers()):
            self.model.set_submodule(name, wrapper.active_module)
        return self.model
