"""AdaLoRA ``rank_pattern`` helpers: which triplets a saved, pruned adapter kept per module.

A rank pattern maps ``"<module path>.lora_E"`` to a keep mask over the module's ``init_r`` triplets.
On save the rows of A and E and the columns of B are sliced by the mask (PEFT's format, rank 0
allowed). On load the usual path builds each module at the pruned rank; resuming training into an
adapter that still holds all ``init_r`` triplets instead scatters the saved triplets back to their
positions, with zeros for the pruned ones — the same state the run had in memory when it saved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

__all__ = ["expand_pruned_tensors", "masks_by_module"]

SAVED_PREFIX = "base_model.model."
TRIPLET_NAMES = ("lora_A", "lora_E", "lora_B")


def masks_by_module(
    rank_pattern: Mapping[str, list[bool]], modern: Callable[[str], str] | None = None
) -> dict[str, list[bool]]:
    """``{module path: keep mask}`` from ``{"<module>.lora_E": mask}``, also under each path's modern
    spelling when ``modern`` (legacy → current module name) is given."""
    out: dict[str, list[bool]] = {}
    for key, mask in rank_pattern.items():
        module = key[: -len(".lora_E")] if key.endswith(".lora_E") else key.rsplit(".lora_E", 1)[0]
        out[module] = [bool(k) for k in mask]
        if modern is not None:
            out.setdefault(modern(module), out[module])
    return out


def _scatter(tensor: torch.Tensor, keep: torch.Tensor, name: str, rank: int) -> torch.Tensor:
    """A (k, in)/E (k, 1) rows or B (out, k) columns put back at the kept positions of ``rank``."""
    if name == "lora_B":
        full = tensor.new_zeros(tensor.shape[0], rank)
        full[:, keep] = tensor
    else:
        full = tensor.new_zeros(rank, *tensor.shape[1:])
        full[keep] = tensor
    return full


def expand_pruned_tensors(
    tensors: Mapping[str, torch.Tensor],
    masks: Mapping[str, list[bool]],
    ranks: Mapping[str, int],
    spellings: Callable[[str], Iterable[str]],
) -> tuple[dict[str, torch.Tensor], bool]:
    """Saved triplets scattered back to full rank where the in-memory module was not resized.

    Args:
        tensors: Saved tensors (``base_model.model.<module>.lora_A`` ...; sliced by the masks).
        masks: Keep mask per module path (any spelling, see :func:`masks_by_module`).
        ranks: Current rank of each in-memory module holding the adapter.
        spellings: The spellings of a saved module path to try against ``ranks`` (current and legacy).

    Returns:
        The tensors (expanded where a module still holds ``len(mask)`` triplets) and whether any was.
    """
    out = dict(tensors)
    expanded = False
    for key, tensor in tensors.items():
        module, _, name = key.removeprefix(SAVED_PREFIX).rpartition(".")
        if name not in TRIPLET_NAMES:
            continue
        names = list(spellings(module))
        mask = next((masks[n] for n in names if n in masks), None)
        rank = next((ranks[n] for n in names if n in ranks), None)
        if mask is None or rank is None or rank != len(mask) or sum(mask) == rank:
            continue
        saved_rank = tensor.shape[1] if name == "lora_B" else tensor.shape[0]
        if saved_rank != sum(mask):
            continue  # not a sliced tensor; the shape check on load reports it
        out[key] = _scatter(tensor, torch.tensor(mask, dtype=torch.bool, device=tensor.device), name, rank)
        expanded = True
    return out, expanded
