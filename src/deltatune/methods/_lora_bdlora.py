"""BD-LoRA (``LoraConfig(use_bdlora=BdLoraConfig(...))``, as PEFT 0.21.2 has it): in the modules its patterns
name, LoRA's A (in → r) or B (r → out) is block-diagonal with ``nblocks`` blocks, so that a sharded inference
engine serves the adapter without communication between shards. A block-diagonal factor is stored as PEFT
stores it, the blocks stacked: weight (out, in / nblocks), block i mapping input slice i to output slice i.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["BlockDiagonalLinear", "bdlora_factor", "dense_weight"]


class BlockDiagonalLinear(nn.Module):
    """A bias-free linear map whose (out, in) matrix is block-diagonal: ``weight`` (out, in / nblocks) holds the
    ``nblocks`` blocks of shape (out / nblocks, in / nblocks), stacked.

    Raises:
        ValueError: when ``in_features`` or ``out_features`` is not a multiple of ``nblocks``.
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int, **kw: Any) -> None:
        super().__init__()
        if in_features % nblocks or out_features % nblocks:
            raise ValueError(
                f"BD-LoRA: in_features={in_features} or out_features={out_features} not divisible by "
                f"nblocks={nblocks}; choose nblocks dividing both (and r), or leave this module out"
            )
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → (..., out), block by block."""
        nb = self.nblocks
        blocks = self.weight.view(nb, self.out_features // nb, self.in_features // nb)
        xs = x.reshape(*x.shape[:-1], nb, self.in_features // nb)
        return torch.einsum("...bi,boi->...bo", xs, blocks).reshape(*x.shape[:-1], self.out_features)

    def dense(self) -> torch.Tensor:
        """The (out, in) block-diagonal matrix."""
        return torch.block_diag(*self.weight.chunk(self.nblocks, dim=0))


def dense_weight(module: nn.Module) -> torch.Tensor | None:
    """A block-diagonal factor's (out, in) matrix, or None for any other module."""
    return module.dense() if isinstance(module, BlockDiagonalLinear) else None


def bdlora_factor(
    options: Any, module_name: str, lora_a: nn.Module, lora_b: nn.Module
) -> tuple[str, nn.Module] | None:
    """("lora_A" or "lora_B", its block-diagonal replacement) for the module ``module_name``, or None where the
    patterns of ``options`` (a ``BdLoraConfig``) name neither factor. A is drawn Kaiming-uniform (a = 0), B is
    zero, both in the base weight's dtype, as in PEFT.

    Raises:
        ValueError: when the name matches both pattern lists, or neither with ``match_strict``.
    """
    in_a = any(p in module_name for p in options.target_modules_bd_a or [])
    in_b = any(p in module_name for p in options.target_modules_bd_b or [])
    if in_a and in_b:
        raise ValueError(f"Target {module_name} matches both A and B block-diagonal patterns")
    if not (in_a or in_b):
        if options.match_strict:
            raise ValueError(
                f"Target {module_name} matches neither A nor B block-diagonal patterns. If this is intentional, "
                "set match_strict=False in BdLoraConfig."
            )
        return None
    old: Any = lora_a if in_a else lora_b
    kw = {"dtype": old.weight.dtype, "device": old.weight.device}
    new = BlockDiagonalLinear(old.in_features, old.out_features, options.nblocks, **kw)
    with torch.no_grad():
        if in_a:
            nn.init.kaiming_uniform_(new.weight)
        else:
            nn.init.zeros_(new.weight)
    return ("lora_A" if in_a else "lora_B"), new
