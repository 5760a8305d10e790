"""PEFT's ``modules_to_save``: modules trained in full next to the adapter (a classifier head), one deep copy
per adapter, the original kept frozen."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from .layers import module_weight

__all__ = ["ModulesToSaveWrapper"]


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

    def set_adapter(self, adapter_name: str | list[str] | None) -> None:
        """Makes the copy of ``adapter_name`` the one used (and trainable); others freeze."""
        if isinstance(adapter_name, list):
            held = [n for n in adapter_name if n in self.modules_to_save]
            if len(held) > 1:
                warnings.warn(
                    f"several adapters with modules_to_save are active ({held}); using {held[0]!r}",
                    stacklevel=2,
                )
            adapter_name = held[0] if held else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name)
        held_name = adapter_name is not None and adapter_name in self.modules_to_save
        self.active_adapter = adapter_name if held_name else None

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
            active = self.__dict__.get("active_adapter")
            disabled = self.__dict__.get("disable_adapters", False)
            module = original if disabled or active not in copies else copies[active]
            return getattr(module, name)

    @property
    def active_module(self) -> nn.Module:
        """The module forward runs: the active copy, or the original when disabled or none active."""
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module(*args, **kwargs)
