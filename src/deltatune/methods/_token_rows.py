"""Trainable tokens: only chosen rows of an embedding train (PEFT's ``TrainableTokensLayer`` and
``TrainableTokensWrapper``, format-compatible).

The layer keeps, per adapter, the new values of the listed rows (``trainable_tokens_delta``, shape
(len(indices), dim), initialised to the rows themselves, so the adapter starts as a no-op) and a frozen copy
of the original rows. Forward looks tokens up in the base weight with those rows replaced (an
``index_copy``, not a sum: whatever the base rows hold, the adapter's rows win); merging writes the rows into
the base weight, unmerging writes the originals back. With tied input and output embeddings, the output
layer (``lm_head``) gets a layer *tied* to the embedding's: it shares the embedding layer's tensors and
saves nothing of its own.

LoRA's ``trainable_token_indices`` puts each such layer inside a :class:`TrainableTokensWrapper`
(``<embedding>.token_adapter``), as PEFT does, so the saved keys are PEFT's
(``…embed_tokens.token_adapter.trainable_tokens_delta``). A shared helper of the methods (not a method).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TargetSpec
from ..layers import AdapterLayer
from ..modules_to_save import AdapterLayerHolder, ModulesToSaveWrapper

__all__ = ["TrainableTokensLayer", "TrainableTokensWrapper", "input_embedding", "tied_embedding_names"]


class TrainableTokensLayer(AdapterLayer):
    """Trains the rows ``token_indices`` of an ``nn.Embedding`` (or, tied to an embedding's layer, of the
    ``nn.Linear`` output head that shares its weight).

    Args:
        base_layer: The embedding (or tied head).
        tied_to: The embedding's layer whose tensors this one follows (None: a layer of its own).
    """

    adapter_param_names: ClassVar[tuple[str, ...]] = ("trainable_tokens_delta",)
    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.Embedding, nn.Linear)
    trainable_tokens_delta: nn.ParameterDict

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__(base_layer)
        self._tied = (
            [tied_to] if tied_to is not None else []
        )  # a list: not a submodule, not in the state dict
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict[str, list[int]] = {}
            self.trainable_tokens_original: dict[str, torch.Tensor] = {}
        else:  # the same containers: training either trains both
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.token_indices = tied_to.token_indices
            self.trainable_tokens_original = tied_to.trainable_tokens_original
        self._extra_per_adapter.update(
            token_indices=self.token_indices, trainable_tokens_original=self.trainable_tokens_original
        )

    @property
    def tied_adapter(self) -> TrainableTokensLayer | None:
        """The embedding's layer this one is tied to (None for a layer of its own)."""
        return self._tied[0] if self._tied else None

    def add_adapter(self, adapter_name: str, target: TargetSpec) -> None:
        """From a config with ``token_indices`` and ``init_weights`` (the standalone method's)."""
        config: Any = target.config
        self.update_layer(
            adapter_name, list(config.token_indices), bool(getattr(config, "init_weights", True))
        )

    def update_layer(self, adapter_name: str, token_indices: list[int], init_weights: bool = True) -> None:
        """Creates ``adapter_name`` for the rows ``token_indices``: their current values (or random ones with
        ``init_weights=False``) as the trainable rows, and a frozen copy of the originals. A tied layer only
        records the adapter (its tensors are the embedding layer's).

        Raises:
            ValueError: for an index outside the embedding.
        """
        if self.tied_adapter is None:
            weight = self.base_weight
            rows = int(weight.shape[0])
            bad = [i for i in token_indices if not -rows <= int(i) < rows]
            if bad:
                raise ValueError(
                    f"trainable token indices {bad[:5]} are outside the embedding of {rows} tokens; "
                    f"choose indices from 0 to {rows - 1}"
                )
            self.token_indices[adapter_name] = [int(i) for i in token_indices]
            originals = weight.detach()[self.token_indices[adapter_name]].clone()
            values = originals.clone() if init_weights else torch.randn_like(originals)
            self.trainable_tokens_delta[adapter_name] = nn.Parameter(values)
            self.trainable_tokens_original[adapter_name] = originals
        self._finish_update(adapter_name)

    # ---- the maths --------------------------------------------------------------------------
    def _index(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.token_indices[adapter_name], dtype=torch.long, device=device)

    def _check_overlap(self, names: list[str]) -> None:
        """PEFT's rule: adapters used together (or merged) must train disjoint tokens.

        Raises:
            ValueError: naming the adapter whose indices overlap the others'.
        """
        seen: set[int] = set()
        for name in dict.fromkeys([*self.merged_adapters, *names]):
            rows = set(self.token_indices.get(name, ()))
            if seen & rows:
                raise ValueError(
                    f"Token indices of adapter {name} are already defined and would result in undefined merging "
                    "behavior. Only disjunct token indices are currently supported."
                )
            seen |= rows

    def merged_weights(self, adapter_names: Iterable[str]) -> torch.Tensor:
        """The base weight with the rows of ``adapter_names`` replaced (a new tensor, gradients flow to the
        trainable rows)."""
        weight = self.base_weight
        for name in adapter_names:
            if name in self.trainable_tokens_delta:
                rows = self.trainable_tokens_delta[name].to(weight)
                weight = weight.index_copy(0, self._index(name, weight.device), rows)
        return weight

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW: the new rows minus the current ones (zero elsewhere)."""
        return self.merged_weights([adapter_name]) - self.base_weight

    def _lookup(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(
                x,
                weight,
                base.padding_idx,
                base.max_norm,
                base.norm_type,
                base.scale_grad_by_freq,
                base.sparse,
            )
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma's) scale in their forward
            return out if scale is None else out * torch.as_tensor(scale).to(out.dtype)
        return F.linear(x, weight, self.base_bias)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.batch_adapter_names is not None or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self._held]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        self._check_overlap(names)
        return self._lookup(x, self.merged_weights(names))

    def transform_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """(The rows of a mixed batch that use ``adapter_name``.) The lookup with its rows replaced."""
        return self._lookup(x, self.merged_weights([adapter_name])).to(result.dtype)

    # ---- merging ----------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Writes the rows of ``adapter_names`` (default the active ones) into the base weight.

        Raises:
            ValueError: with ``safe_merge`` when the rows are not finite (the weight is left unchanged), or
                when the adapters' indices overlap.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        if isinstance(names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {names!r}")
        self._warn_if_merged(names)
        names = [n for n in names if n in self._held and n not in self.merged_adapters]
        if not names:
            return
        self._check_overlap(names)
        weight = self.base_weight
        for name in names:
            rows = self.trainable_tokens_delta[name].detach().to(weight)
            if safe_merge and not torch.isfinite(rows).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken"
                )
            with torch.no_grad():
                weight.data.index_copy_(0, self._index(name, weight.device), rows)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Writes the original rows back, in reverse merge order."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.base_weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            originals = self.trainable_tokens_original[name].to(weight)
            with torch.no_grad():
                weight.data.index_copy_(0, self._index(name, weight.device), originals)

    # ---- saving -----------------------------------------------------------------------------
    def export_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The trainable rows; nothing for a tied layer (the embedding's layer saves them)."""
        return {} if self.tied_adapter is not None else super().export_tensors(adapter_name)

    def cast_adapter(self, adapter_name: str, dtype: torch.dtype) -> None:
        """The rows stay in the embedding's dtype (they replace its rows)."""

    def _delete_tensors(self, adapter_name: str) -> None:
        if self.tied_adapter is not None:  # the embedding's layer owns (and deletes) the tensors
            self._held.pop(adapter_name, None)
            return
        super()._delete_tensors(adapter_name)

    def extra_repr(self) -> str:
        tied = ", tied to the input embedding" if self.tied_adapter is not None else ""
        return super().extra_repr() + tied


class TrainableTokensWrapper(AdapterLayerHolder):
    """PEFT's wrapper for LoRA's ``trainable_token_indices``: holds a :class:`TrainableTokensLayer` as
    ``token_adapter`` (so the tensors' names are PEFT's); ``weight`` is the weight forward uses, and other
    attributes (``embedding_dim``, ``padding_idx``, ...) are the wrapped module's."""

    holder_attr: ClassVar[str] = "token_adapter"

    def __init__(self, layer: TrainableTokensLayer) -> None:
        super().__init__()
        self.token_adapter = layer

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.token_adapter(x, *args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight with the active adapters' rows in place (a tensor, not a parameter, as in PEFT)."""
        layer = self.token_adapter
        if layer.disable_adapters or layer.merged:
            return layer.base_weight
        return layer.merged_weights([n for n in layer.active_adapters if layer.holds(n)])


def input_embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the model's input embedding as the model holds it (perhaps wrapped), or None."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    if embedding is None:
        return None
    for name, module in model.named_modules():
        if module is embedding:
            return name, module
    return None


def _unwrapped(module: nn.Module) -> nn.Module:
    """The plain module inside deltatune's wrappers (adapter layer, holder, ``modules_to_save``)."""
    for _ in range(4):
        if isinstance(module, AdapterLayerHolder):
            module = module.held_layer
        elif isinstance(module, AdapterLayer):
            module = module.base_layer
        elif isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        else:
            break
    return module


def tied_embedding_names(model: nn.Module) -> list[str]:
    """Names of the modules whose weight is the input embedding's (``lm_head`` in a model with
    ``tie_word_embeddings=True``), as the model holds them; empty when the config says the embeddings are not
    tied."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", None) is False:
        return []
    found = input_embedding(model)
    if found is None:
        return []
    embed_name, embedding = found
    weight = getattr(_unwrapped(embedding), "weight", None)
    if not isinstance(weight, nn.Parameter):
        return []
    names: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or name == embed_name or name.startswith(f"{embed_name}."):
            continue
        if any(name.startswith(f"{n}.") for n in names):  # inside a module already found
            continue
        inner = _unwrapped(module)
        if isinstance(inner, nn.Linear) and inner.weight is weight:
            names.append(name)
    return names
