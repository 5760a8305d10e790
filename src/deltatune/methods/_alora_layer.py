"""aLoRA's layer and offsets (formula and paper: :mod:`.alora`).

The offsets are a LongTensor (batch,): how many of each row's last positions the adapter applies to (0: none),
computed on the device from ``input_ids`` without host synchronisation; a layer clips them to the length of
the sequence it sees (1 for each generated token after the prompt, so generation keeps the adapter on).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..layer_types import Conv1D
from ..layers import expect_config
from ._lora_layer import LoraLayer
from .lora import LoraConfig

__all__ = [
    "ALoraLayer",
    "alora_offsets",
    "alora_offsets_kept",
    "calculate_alora_offsets",
    "get_alora_offsets_for_forward",
    "get_alora_offsets_for_generate",
    "invocation_offsets",
]

#: PEFT's warnings when a forward or ``generate`` call gives no ``input_ids`` to find the invocation in.
EMBEDS_ONLY_WARNING = "Cannot calculate aLoRA offsets when only inputs_embeds are provided. Disabling aLoRA for this forward pass."
GENERATE_WITHOUT_IDS_WARNING = (
    "Cannot calculate aLoRA offsets during generate as input_ids are not available. Disabling aLoRA."
)
#: The row name of PEFT's ``adapter_names`` that runs the base model.
BASE_ROW = "__base__"


# ---- offsets -----------------------------------------------------------------------------------
def invocation_offsets(input_ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """For each row of ``input_ids`` (batch, seq): seq − (start of the last occurrence of ``tokens``), or 0 when
    they do not occur (PEFT's ``calculate_alora_offsets`` for one adapter)."""
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    seq, n = ids.shape[-1], len(tokens)
    if n == 0 or n > seq:
        return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    wanted = torch.tensor(tokens, dtype=ids.dtype, device=ids.device)
    found = (ids.unfold(1, n, 1) == wanted).all(-1)  # (batch, seq − n + 1): a match starts here
    starts = torch.arange(found.shape[1], device=ids.device)
    last = torch.where(found, starts, -1).amax(dim=1)
    return torch.where(last >= 0, seq - last, 0)


def alora_offsets(
    configs: Mapping[str, Any], active: Iterable[str], input_ids: torch.Tensor | None
) -> torch.Tensor | None:
    """The offsets of the first active aLoRA adapter for ``input_ids`` (None without ``input_ids``)."""
    if input_ids is None:
        return None
    for name in active:
        tokens = getattr(configs.get(name), "alora_invocation_tokens", None)
        if tokens:
            return invocation_offsets(input_ids, list(tokens))
    return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)


def uses_alora(configs: Mapping[str, Any], active: Iterable[str]) -> bool:
    """Whether an active adapter is an aLoRA adapter."""
    return any(getattr(configs.get(n), "alora_invocation_tokens", None) for n in active)


def offsets_from_inputs(
    configs: Mapping[str, Any], active: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """The offsets for a forward or ``generate`` call: its ``alora_offsets`` argument (PEFT's list, None for a
    row without the invocation; taken out of ``kwargs``) or else computed from its ``input_ids`` (keyword or first
    positional argument); None, with PEFT's warning, when only ``inputs_embeds`` is given.

    Raises:
        ValueError: for ``num_beams`` > 1 (PEFT's refusal).
    """
    explicit = kwargs.pop("alora_offsets", None)
    beams = kwargs.get("num_beams")
    if isinstance(beams, int) and beams > 1:
        raise ValueError("Beam search not yet supported for aLoRA.")
    if explicit is not None:
        return torch.tensor([0 if o is None else int(o) for o in explicit], dtype=torch.long)
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], torch.Tensor):
        input_ids = args[0]
    if input_ids is None and kwargs.get("inputs_embeds") is not None:
        warnings.warn(EMBEDS_ONLY_WARNING, stacklevel=4)
    return alora_offsets(configs, active, input_ids)


# ---- PEFT's offset functions (``peft.tuners.lora.variants``), for loops that call the model themselves ----
def calculate_alora_offsets(
    peft_config: Mapping[str, Any],
    active_adapter: str,
    input_ids: torch.Tensor | None,
    adapter_names: list[str] | None = None,
) -> list[int | None]:
    """Each row's aLoRA offset as PEFT gives it: how many of the row's last positions the adapter applies to,
    counted from the start of the last occurrence of its invocation tokens (so at least their number), or None
    where the row's adapter is not an aLoRA adapter, is ``"__base__"`` or is unknown (with PEFT's warning), or
    its invocation does not occur. The search is :func:`invocation_offsets`, once per adapter for its rows.

    Args:
        peft_config: Adapter name → config (``model.peft_config``).
        active_adapter: The adapter of the rows that ``adapter_names`` does not name.
        input_ids: (batch, seq) token ids; a 1-D tensor is one row.
        adapter_names: Per row, the adapter that runs it (``forward(adapter_names=...)``), optional.

    Returns:
        One entry per row ([] without ``input_ids``); an explicit ``alora_offsets`` for forward or ``generate``.
    """
    if input_ids is None:
        return []
    ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
    offsets: list[int | None] = [None] * ids.shape[0]
    rows_of: dict[str, list[int]] = {}
    for row in range(ids.shape[0]):
        name = adapter_names[row] if adapter_names and row < len(adapter_names) else active_adapter
        if name == BASE_ROW:
            continue
        if name not in peft_config:
            warnings.warn(
                f"Adapter '{name}' not found in peft_config. Using base model for row {row}.", stacklevel=2
            )
            continue
        if getattr(peft_config[name], "alora_invocation_tokens", None):
            rows_of.setdefault(name, []).append(row)
    for name, rows in rows_of.items():
        tokens = list(peft_config[name].alora_invocation_tokens)
        picked = ids.index_select(0, torch.tensor(rows, device=ids.device))
        for row, offset in zip(rows, invocation_offsets(picked, tokens).tolist(), strict=True):
            offsets[row] = offset or None
    return offsets


def _alora_in_batch(model: Any, adapter_names: list[str] | None) -> bool:
    """Whether an active adapter of ``model``, or one that ``adapter_names`` names, is an aLoRA adapter."""
    named = [n for n in adapter_names or () if n != BASE_ROW]
    return uses_alora(model.peft_config, [*model.active_adapters, *named])


def _first_active(model: Any) -> str:
    active = model.active_adapter
    return active if isinstance(active, str) else active[0]


def get_alora_offsets_for_forward(
    model: Any,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The keyword arguments of a forward call of ``model`` (a :class:`~deltatune.PeftModel`) with
    ``alora_offsets`` filled in from ``input_ids`` (:func:`calculate_alora_offsets`) when an aLoRA adapter is
    active or named in ``adapter_names``; an ``alora_offsets`` already in ``kwargs`` is kept. With only
    ``inputs_embeds`` the offsets are None (aLoRA off for the call), with PEFT's warning.

    Returns:
        ``kwargs`` (the same dict), without ``input_ids`` and ``inputs_embeds``.
    """
    names = kwargs.get("adapter_names")
    if not _alora_in_batch(model, names) or kwargs.get("alora_offsets") is not None:
        return kwargs
    if input_ids is None and inputs_embeds is not None:
        warnings.warn(EMBEDS_ONLY_WARNING, stacklevel=2)
    kwargs["alora_offsets"] = (
        None
        if input_ids is None
        else calculate_alora_offsets(model.peft_config, _first_active(model), input_ids, adapter_names=names)
    )
    return kwargs


def get_alora_offsets_for_generate(model: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments of a ``generate`` call of ``model`` with ``alora_offsets`` filled in from its
    ``input_ids`` (keyword, or the first positional argument; a 1-D prompt is one row) when an aLoRA adapter is
    active or named in ``adapter_names``; an ``alora_offsets`` already in ``kwargs`` is kept. Without
    ``input_ids`` the offsets are None, with PEFT's warning.

    Returns:
        ``kwargs`` (the same dict).
    """
    names = kwargs.get("adapter_names")
    if not _alora_in_batch(model, names) or kwargs.get("alora_offsets") is not None:
        return kwargs
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], torch.Tensor):
        input_ids = args[0]
    if input_ids is None:
        warnings.warn(GENERATE_WITHOUT_IDS_WARNING, stacklevel=2)
        kwargs["alora_offsets"] = None
        return kwargs
    kwargs["alora_offsets"] = calculate_alora_offsets(
        model.peft_config, _first_active(model), input_ids, adapter_names=names
    )
    return kwargs


@contextmanager
def alora_offsets_kept(layers: Iterable[nn.Module], offsets: torch.Tensor | None) -> Iterator[None]:
    """Gives every aLoRA layer ``offsets`` within the block (``generate``), then its previous ones."""
    held = [layer for layer in layers if isinstance(layer, ALoraLayer)]
    before = [layer.alora_offsets for layer in held]
    for layer in held:
        layer.alora_offsets = offsets
    try:
        yield
    finally:
        for layer, old in zip(held, before, strict=True):
            layer.alora_offsets = old


# ---- layer --------------------------------------------------------------------------------------
class ALoraLayer(LoraLayer):
    """LoRA on a Linear whose aLoRA adapters apply only to the last ``alora_offsets[i]`` positions of row i;
    plain LoRA adapters can share it (as in PEFT). Set by the tuner before a forward and kept afterwards, so a
    gradient-checkpointing recomputation in backward sees the same offsets."""

    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, Conv1D)
    alora_offsets: torch.Tensor | None
    _alora: dict[str, None]

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._init_alora()

    def _init_alora(self) -> None:
        self.alora_offsets = None
        self._alora = {}
        self._extra_per_adapter["alora"] = self._alora

    @classmethod
    def extend_layer(cls, layer: Any) -> None:
        """Turns a LoRA layer into this one in place, its adapters kept (an aLoRA adapter joins plain ones)."""
        layer.__class__ = cls
        layer._init_alora()

    def update_layer(self, adapter_name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        config = expect_config(config, LoraConfig)
        super().update_layer(adapter_name, config, r, alpha)
        if config.alora_invocation_tokens is not None:
            self._alora[adapter_name] = None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """As LoRA's, but an aLoRA adapter cannot be merged (its term depends on the position).

        Raises:
            NotImplementedError: for an aLoRA adapter, as PEFT.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        if any(n in self._alora for n in names):
            raise NotImplementedError(f"aLoRA does not support {'safe ' if safe_merge else ''}merging.")
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.batch_adapter_names is not None and any(n in self._alora for n in self.batch_adapter_names):
            raise NotImplementedError(
                "PeftModel.forward(adapter_names=...) with aLoRA adapters is not supported by deltatune; run "
                "their rows in a batch of their own"
            )
        return super().forward(x, *args, **kwargs)

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        return None if adapter_name in self._alora else super().fused_forward(x, adapter_name)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if adapter_name not in self._alora:
            return super().add_adapter_output(result, x, adapter_name)
        offsets = self.alora_offsets
        if offsets is None:  # no offsets: the base output (PEFT keeps the adapter in the graph, at zero)
            return result + 0 * self.adapter_output(x, adapter_name).to(result.dtype)
        length = result.shape[1] if result.dim() == 3 else 1
        positions = torch.arange(length, device=result.device)
        mask = positions.unsqueeze(0) >= (length - offsets.to(result.device).clamp(max=length)).unsqueeze(1)
        if result.dim() == 3:
            mask = mask.unsqueeze(-1)
        delta = self.adapter_output(x, adapter_name).to(result.dtype)
        return torch.where(mask, result + delta, result)
