"""PEFT's ``modules_to_save``: modules trained in full next to the adapter (a classifier head), one deep copy
per adapter, the original kept frozen."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from .layers import module_weight

__all__ = ["MIXED_BATCH_TYPES", "AdapterLayerHolder", "ModulesToSaveWrapper"]

#: Module types whose rows a mixed batch may send through different copies.
MIXED_BATCH_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and trains a deep copy per adapter (PEFT's ``modules_to_save``).

    Args:
        module_to_save: The module to wrap; kept as ``original_module``.
        adapter_name: Name of the first trainable copy.
    """

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = adapter_name
        self.disable_adapters = False
        self.original_module.requires_grad_(False)
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        """Adds a trainable copy of the original module for ``adapter_name``."""
        if adapter_name not in self.modules_to_save:
            clone = copy.deepcopy(self.original_module)
            clone.requires_grad_(True)
            self.modules_to_save[adapter_name] = clone

    def set_adapter(self, adapter_name: str | list[str] | None, inference_mode: bool = False) -> None:
        """Makes the copy of ``adapter_name`` the one used (and trainable unless ``inference_mode``); others
        freeze. Of a list, the one adapter that holds a copy here is used.

        Raises:
            ValueError: when several of the listed adapters hold a copy of this module (copies replace the
                module, they cannot be added up; PEFT's error).
        """
        if isinstance(adapter_name, list | tuple):
            held = [n for n in adapter_name if n in self.modules_to_save]
            if len(held) > 1:
                raise ValueError(
                    f"Only one adapter can be set at a time for ModulesToSaveWrapper, got {held}: these "
                    "adapters each hold a copy of this module"
                )
            adapter_name = held[0] if held else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name and not inference_mode)
        held_name = adapter_name is not None and adapter_name in self.modules_to_save
        self.active_adapter = adapter_name if held_name else None

    @property
    def active_adapter(self) -> str | None:
        """The adapter whose copy forward uses (None: the original); stored as ``_active_adapter``, as in PEFT."""
        return self.__dict__.get("_active_adapter")

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        self.__dict__["_active_adapter"] = name

    @property
    def active_adapters(self) -> list[str]:
        """The adapter whose copy is used, as a list (empty when the original is used)."""
        return [] if self.active_adapter is None else [self.active_adapter]

    @property
    def _adapters(self) -> set[str]:
        """The adapters that have a copy here (PEFT's ``AuxiliaryTrainingWrapper._adapters``)."""
        return set(self.modules_to_save)

    def enable_adapters(self, enabled: bool) -> None:
        """Disabled, forward uses the original module and the copies are frozen."""
        if not enabled:
            self.modules_to_save.requires_grad_(False)
        self.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    @property
    def weight(self) -> torch.Tensor:
        """The weight of the module forward runs (so code reading ``.weight`` keeps working)."""
        return module_weight(self.active_module)

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks (``in_features``, ``num_labels``, ...) come from the active module."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if modules is None or name in ("original_module", "modules_to_save"):
                raise
            original, copies = modules.get("original_module"), modules.get("modules_to_save")
            if original is None or copies is None:
                raise
            active = self.__dict__.get("_active_adapter")
            disabled = self.__dict__.get("disable_adapters", False)
            if not disabled and active is not None and active not in copies:
                raise  # the active adapter has no copy here (PEFT's failsafe: no silent fall-back)
            module = original if disabled or active is None else copies[active]
            return getattr(module, name)

    @property
    def active_module(self) -> nn.Module:
        """The module forward runs: the active copy, or the original when disabled or none active."""
        active = self.active_adapter
        if self.disable_adapters or active is None:
            return self.original_module
        if active not in self.modules_to_save:
            raise AttributeError(f"{type(self).__name__} holds no copy for its active adapter {active!r}")
        return self.modules_to_save[active]

    #: During ``PeftModel.forward(adapter_names=[...])``: the adapter of each row of the batch.
    batch_adapter_names: list[str] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rows = self.batch_adapter_names
        if rows is not None and not self.disable_adapters:
            return self._mixed_batch_forward(rows, *args, **kwargs)
        return self.active_module(*args, **kwargs)

    def _mixed_batch_forward(
        self, rows: list[str], x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Each row of ``x`` through its adapter's copy (the original for ``"__base__"`` or an adapter without
        one), for plain layers as PEFT allows.

        Raises:
            TypeError: for a module type whose rows cannot be split this way.
        """
        if not isinstance(self.original_module, MIXED_BATCH_TYPES):
            names = ", ".join(t.__name__ for t in MIXED_BATCH_TYPES)
            raise TypeError(f"Mixed batching is only supported for the following modules: {names}.")
        out: list[torch.Tensor | None] = [None] * len(x)
        copies: dict[str, nn.Module] = dict(self.modules_to_save.items())
        for name in dict.fromkeys(rows):
            index = [i for i, n in enumerate(rows) if n == name]
            module = copies.get(name, self.original_module)
            result = module(x[index], *args, **kwargs)
            for j, i in enumerate(index):
                out[i] = result[j]
        return torch.stack([t for t in out if t is not None])


class AdapterLayerHolder(nn.Module):
    """A module that only holds one adapter layer, as its attribute :attr:`holder_attr` (PEFT's
    ``TrainableTokensWrapper`` holds its layer as ``token_adapter``, and the saved keys say so). Target matching
    does not look inside it, and unloading puts the held layer's unwrapped module in the holder's place."""

    holder_attr: ClassVar[str] = "adapter_layer"

    @property
    def held_layer(self) -> nn.Module:
        """The adapter layer held (or, once unloaded, the module put back)."""
        module = self._modules[self.holder_attr]
        assert module is not None
        return module

    @property
    def _adapters(self) -> set[str]:
        """The adapters the held layer holds (PEFT's ``AuxiliaryTrainingWrapper._adapters``)."""
        return set(getattr(self.held_layer, "adapter_names", ()))

    @property
    def active_adapters(self) -> list[str]:
        """The held layer's active adapters."""
        return list(getattr(self.held_layer, "active_adapters", ()))

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activates ``adapter_names`` on the held layer (PEFT's ``TrainableTokensWrapper.set_adapter``)."""
        setter = getattr(self.held_layer, "set_adapter", None)
        if setter is None:
            raise AttributeError(f"{type(self.held_layer).__name__} has no adapters to set")
        setter(adapter_names, inference_mode=inference_mode)

    def __getattr__(self, name: str) -> Any:
        """Attributes the holder lacks (``embedding_dim``, ``padding_idx``, ...) come from the held layer's
        base module."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            held = modules.get(self.holder_attr) if modules else None
            if held is None or name == self.holder_attr:
                raise
            return getattr(getattr(held, "base_layer", held), name)
