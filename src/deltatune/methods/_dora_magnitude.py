"""DoRA's magnitude tensors as PEFT's code reads them (``layer.lora_magnitude_vector[name].weight``).

PEFT keeps each adapter's magnitude in a small module whose parameter is ``weight``; deltatune keeps the
parameter itself in an ``nn.ParameterDict`` (in-memory key ``…lora_magnitude_vector.<name>``; the files drop the
adapter name either way, so they are the same bytes). :class:`DoraMagnitude` is that parameter, answering
``.weight`` with itself, so both spellings reach the one tensor: ``m[name].weight.grad``, ``m[name].weight.add_``
and ``m[name].mul_`` all read or change what the layer uses. :class:`DoraMagnitudes` keeps every entry a
:class:`DoraMagnitude` whoever puts a parameter there (``load_state_dict(assign=True)``, a ``meta`` parameter
materialised on load, a move to a device whose tensors torch swaps rather than converts in place, where the
parameter keeps its identity too). A :class:`DoraMagnitude` stays one through ``pickle``, ``torch.save`` /
``torch.load`` (``weights_only=True`` included: its rebuild function is one of torch's safe globals) and
``copy.deepcopy``, where ``nn.Parameter`` would rebuild a plain parameter. ``state_dict()`` keys are PEFT's
(``…lora_magnitude_vector.<name>.weight``, see :class:`DoraMagnitudes`); ``named_parameters()`` keeps the
parameter's own name.
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

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # nn.Parameter's reduce rebuilds an nn.Parameter, whatever the subclass: rebuild this class, with the
        # attributes set on the parameter (transformers' ``_is_hf_initialized``, ...)
        return (_rebuild_dora_magnitude, (self.data, self.requires_grad, dict(vars(self))))


def _rebuild_dora_magnitude(data: torch.Tensor, requires_grad: bool, state: dict[str, Any]) -> DoraMagnitude:
    """The unpickled :class:`DoraMagnitude` (see :meth:`DoraMagnitude.__reduce_ex__`)."""
    param = DoraMagnitude(data, requires_grad=requires_grad)
    vars(param).update(state)
    return param


# builds a parameter from a tensor and a bool (the state's values go through the same unpickler): harmless, so a
# ``state_dict(keep_vars=True)`` saved with torch.save loads with ``weights_only=True`` as it did before
torch.serialization.add_safe_globals([_rebuild_dora_magnitude])


class DoraMagnitudes(nn.ParameterDict):
    """Adapter name → :class:`DoraMagnitude` (``lora_magnitude_vector``). In ``state_dict()`` each entry has
    PEFT's key, ``…lora_magnitude_vector.<name>.weight``, so full-model checkpoints (``torch.save(model.
    state_dict())``, accelerate, EMA copies) load strictly across the two libraries; ``load_state_dict`` takes
    that key and the parameter's own name (``…<name>``, deltatune's earlier checkpoints)."""

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name, param in self._parameters.items():
            if param is not None:
                destination[f"{prefix}{name}.weight"] = param if keep_vars else param.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in self._parameters:
            if f"{prefix}{name}.weight" in state_dict and f"{prefix}{name}" not in state_dict:
                state_dict[f"{prefix}{name}"] = state_dict.pop(f"{prefix}{name}.weight")
        start = len(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        own = {f"{prefix}{name}" for name in self._parameters}
        missing_keys[start:] = [f"{k}.weight" if k in own else k for k in missing_keys[start:]]

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
        """``nn.Module._apply`` (``.to``, ``.half``, ``to_empty``), whose parameters turned plain (a new one
        where torch cannot convert in place, e.g. to ``meta``; the same object, its class swapped, with
        ``torch.__future__.set_swap_module_params_on_conversion(True)``) become :class:`DoraMagnitude` again
        in place: the same object, its gradient kept."""
        out = super()._apply(fn, recurse)
        for param in self._parameters.values():
            if type(param) is nn.Parameter:  # no state of its own: the class alone changes
                param.__class__ = DoraMagnitude
        return out
