"""Helpers under PEFT's ``peft.utils`` paths, so code written for PEFT finds them where it looks:
:mod:`deltatune.utils.hotswap` (hot-swapping LoRA adapters, with and without ``torch.compile``) and
:func:`get_submodules` (PEFT's ``peft.utils._get_submodules``, which custom code uses to swap a module), and
the names ported scripts import from ``peft.utils``: ``get_peft_model_state_dict``,
``set_peft_model_state_dict``, ``load_peft_weights``, ``TaskType``."""

from __future__ import annotations

from torch import nn

from ..config import TaskType
from ..functional import get_peft_model_state_dict, set_peft_model_state_dict
from ..model_io import load_peft_weights

__all__ = [
    "TaskType",
    "get_peft_model_state_dict",
    "get_submodules",
    "load_peft_weights",
    "set_peft_model_state_dict",
]


def get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """The module named ``key`` with its parent and its attribute name there: ``(parent, target, name)``,
    what ``setattr(parent, name, new)`` needs to replace it (PEFT's ``_get_submodules``).

    Raises:
        AttributeError: when ``model`` has no module named ``key`` (torch's ``get_submodule`` message).
    """
    parent_name, _, name = key.rpartition(".")
    return model.get_submodule(parent_name), model.get_submodule(key), name
