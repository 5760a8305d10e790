"""Mixed-adapter batches for the adapter layers: ``PeftModel.forward(adapter_names=[...])`` sends each row
of a batch through its own adapter (``"__base__"``: none), so one base model serves many fine-tunes in one
batch. A mixin of :class:`deltatune.layers.AdapterLayer`, kept apart from the layers' fast paths."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["MixedBatchMixin"]


class MixedBatchMixin(nn.Module):
    """Checks and forward of a mixed batch; the layer provides ``base_layer``, ``holds``, ``merged``,
    ``disable_adapters`` and ``transform_output``."""

    base_layer: nn.Module
    disable_adapters: bool
    transforms_input: ClassVar[bool]

    def holds(self, adapter_name: str) -> bool:  # provided by the layer
        raise NotImplementedError

    @property
    def merged(self) -> bool:  # provided by the layer
        raise NotImplementedError

    def transform_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:  # provided by the layer
        raise NotImplementedError

    def transform_output(
        self, result: torch.Tensor, x: torch.Tensor, adapter_name: str
    ) -> torch.Tensor:  # provided by the layer
        raise NotImplementedError

    # ---- mixed batches: PeftModel.forward(adapter_names=[...]) ------------------------------------
    #: Whether this layer can run each row of a batch through its own adapter.
    supports_mixed_batch: ClassVar[bool] = True

    def check_mixed_batch(self, x: torch.Tensor, row_adapters: list[str]) -> None:
        """PEFT's checks for ``adapter_names``: one name per row, nothing merged.

        Raises:
            ValueError: on a length mismatch or merged adapters.
            TypeError: when this layer cannot mix adapters in a batch.
        """
        if not self.supports_mixed_batch:
            raise TypeError(f"{self._get_name()} does not support mixed adapter batches.")
        if len(x) != len(row_adapters):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(row_adapters)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def mixed_batch_forward(
        self, x: torch.Tensor, row_adapters: list[str], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Each row through its own adapter's input and output hooks (``"__base__"`` or an adapter this layer
        does not hold: the base alone). Inputs are batched along dim 0."""
        self.check_mixed_batch(x, row_adapters)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        groups = [
            (name, torch.tensor([i for i, n in enumerate(row_adapters) if n == name], device=x.device))
            for name in dict.fromkeys(row_adapters)
            if self.holds(name)  # not "__base__", nor an adapter that does not target this layer
        ]
        base_input = x
        if self.transforms_input:
            for name, rows in groups:
                sub = self.transform_input(base_input.index_select(0, rows), name)
                base_input = base_input.index_copy(0, rows, sub.to(base_input.dtype))
        result = self.base_layer(base_input, *args, **kwargs)
        for name, rows in groups:
            sub = self.transform_output(result.index_select(0, rows), x.index_select(0, rows), name)
            result = result.index_copy(0, rows, sub)
        return result
