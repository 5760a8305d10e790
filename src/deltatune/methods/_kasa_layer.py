"""KaSA's layer and regulariser (formula and paper: :mod:`.kasa`).

The layer is LoRA's (``lora_A``, ``lora_B``, the same initialisation) plus ``lora_diag`` (r,), drawn from
N(0, 1) after A and B as PEFT draws it, and the one-time truncation of the base weight to its k − r largest
singular components (k = min(out, in)), computed in fp32.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..layer_types import Conv1D
from ..layers import expect_config, module_weight
from ._lora_layer import LoraLayer
from .lora import LoraConfig

__all__ = ["KasaLayer", "kasa_delta_weight", "kasa_regularization", "truncate_smallest"]


# ---- pure maths ---------------------------------------------------------------------------------
def truncate_smallest(weight: torch.Tensor, r: int) -> torch.Tensor:
    """``weight`` (out, in) without its ``r`` smallest singular components (SVD in fp32), in its dtype.

    Raises:
        ValueError: when ``r`` ≥ min(out, in): nothing of the base weight would be left (PEFT's rule).
    """
    k = min(weight.shape)
    if r >= k:
        raise ValueError(
            f"KaSA requires `r` ({r}) to be smaller than min(in_features, out_features) ({k}) so that at least one "
            "singular component of the base weight is preserved after truncation."
        )
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    keep = k - r
    return ((u[:, :keep] * s[:keep]) @ vh[:keep]).to(weight.dtype)


def kasa_delta_weight(
    lora_a: torch.Tensor, lora_b: torch.Tensor, diag: torch.Tensor, scaling: float
) -> torch.Tensor:
    """ΔW = s · B diag(d) A: A (r, in), B (out, r), d (r,) → (out, in)."""
    return ((lora_b * diag) @ lora_a) * scaling


def kasa_regularization(
    lora_a: torch.Tensor, lora_b: torch.Tensor, diag: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """β·Σd² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F), in fp32 (the paper's eqs. 9–11, PEFT's ``_get_kasa_loss`` term)."""
    a, b, d = lora_a.float(), lora_b.float(), diag.float()
    eye = torch.eye(d.shape[0], device=d.device, dtype=torch.float32)
    orthogonality = torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
    return beta * (d**2).sum() + gamma * orthogonality


# ---- layer --------------------------------------------------------------------------------------
class KasaLayer(LoraLayer):
    """LoRA on an ``nn.Linear`` with KaSA's learnt diagonal ``lora_diag`` between A and B (saved as PEFT saves
    it); adding an adapter truncates the base weight (see the module doc)."""

    adapter_param_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_diag")
    #: ``Conv1D`` only to refuse it with PEFT's message (its weight is stored transposed).
    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, Conv1D)
    lora_diag: nn.ParameterDict

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_diag = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        """LoRA's factors, then ``lora_diag`` ~ N(0, 1) and the base weight's truncation.

        Raises:
            ValueError: on a ``Conv1D`` (fan_in_fan_out), or when ``r`` ≥ min(in, out).
        """
        config = expect_config(config, LoraConfig)
        if self.fan_in_fan_out:
            raise ValueError(
                "KaSA does not support `fan_in_fan_out=True` layers (e.g. Conv1D). Please target nn.Linear layers."
            )
        super().update_layer(adapter_name, config, r, alpha)
        try:
            weight = self.base_weight
            truncated = truncate_smallest(weight, r)
            a = self.factor_weights(adapter_name)[0]
            self.lora_diag[adapter_name] = nn.Parameter(torch.randn(r, device=a.device, dtype=a.dtype))
        except Exception:
            self._delete_tensors(adapter_name)
            self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
            raise
        with torch.no_grad():
            weight.data.copy_(truncated)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factor_weights(adapter_name)
        diag, scaling = self.lora_diag[adapter_name], self.scaling[adapter_name]
        if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):  # fp32 on CPU, as PEFT
            return kasa_delta_weight(a.float(), b.float(), diag.float(), scaling).to(a.dtype)
        return kasa_delta_weight(a, b, diag, scaling)

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        x = self._cast_input_dtype(self.lora_dropout[adapter_name](x), module_weight(a).dtype)
        return b(a(x) * self.lora_diag[adapter_name]) * self.scaling[adapter_name]

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        return None  # the generic path: base output plus :meth:`adapter_output`

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return result + self.adapter_output(x, adapter_name).to(result.dtype)

    def regularization(self, adapter_name: str, beta: float, gamma: float) -> torch.Tensor:
        """:func:`kasa_regularization` of ``adapter_name``'s tensors."""
        a, b = self.factor_weights(adapter_name)
        return kasa_regularization(a, b, self.lora_diag[adapter_name], beta, gamma)
