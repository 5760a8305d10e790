"""DoRA's magnitude tensors as PEFT's code reads them (``layer.lora_magnitude_vector[name].weight``).

PEFT keeps each adapter's magnitude in a small module whose parameter is ``weight``; deltatune keeps the
parameter itself in an ``nn.ParameterDict`` (in-memory key ``…lora_magnitude_vector.<name>``; the files drop the
adapter name either way, so they are the same bytes). :class:`DoraMagnitude` is that parameter, answering
``.weight`` with itself, so both spellings reach the one tensor: ``m[name].weight.grad``, ``m[name].weight.add_``
and ``m[name].mul_`` all read or change what the layer uses. :class:`DoraMagnitudes` keeps every entry a
:class:`DoraMagnitude` whoever puts a parameter there (``load_state_dict(assign=True)``, a ``meta`` parameter
materialised on load, a move to a device whose tensors torch swaps rather than converts in place).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["DoraMagnitude", "DoraMagnitudes"]


class DoraMagnitude(nn.Parameter):
    """A DoRA adapter's magnitude m: (out,) for a Linear, Conv1D or Embedding, (1, out, 1…) for a conv. An
    ``nn.Parameter`` in every way (torch's function dispatch is off for it, as for ``nn.Parameter``, so it
    costs no extra operation)."""

    @property
    def weight(self) -> DoraMagnitude:
        """This parameter (PEFT's spelling: its magnitude is the ``weight`` of a per-adapter module)."""
        return self


class DoraMagnitudes(nn.ParameterDict):
    """Adapter name → :class:`DoraMagnitude` (``lora_magnitude_vector``)."""

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """Registers ``param``, as a :class:`DoraMagnitude` sharing its storage when it is a plain parameter."""
        if param is not None and not isinstance(param, DoraMagnitude):
            param = DoraMagnitude(param.detach(), requires_grad=param.requires_grad)
        super().register_parameter(name, param)

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        if not isinstance(value, nn.Parameter):  # a tensor becomes the parameter, as in nn.ParameterDict
            value = DoraMagnitude(value)
        super().__setitem__(key, value)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        """``nn.Module._apply`` (``.to``, ``.half``, ``to_empty``), whose new parameters (where torch cannot
        convert in place, e.g. to ``meta``) become :class:`DoraMagnitude` again, their gradients kept."""
        out = super()._apply(fn, recurse)
        for name, param in self._parameters.items():
            if param is not None and not isinstance(param, DoraMagnitude):
                kept = DoraMagnitude(param.detach(), requires_grad=param.requires_grad)
                kept.grad = param.grad
                self._parameters[name] = kept
        return out
