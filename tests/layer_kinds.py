"""Tiny models, one per layer type an adapter can wrap beyond the MLP/conv/ViT of conftest.py.

Each has two targets of its type (the contract needs at least two adapter layers) and a Linear ``head`` for
``modules_to_save``. conftest.py lists them in ``MODEL_KINDS`` with the layer type they exercise; the
contract and interop suites run every method on every kind whose layer type the method supports, so a new
layer type is one model here and one line there.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class Conv1dNet(nn.Module):
    """(batch, 3, 10) → (batch, 4): a k=3 and a k=1 ``nn.Conv1d``, then mean pooling and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=2))


class Conv3dNet(nn.Module):
    """(batch, 2, 4, 4, 4) → (batch, 4): a 3×3×3 and a 1×1×1 ``nn.Conv3d``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv3d(6, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3, 4)))


class GroupedConvNet(nn.Module):
    """(batch, 4, 6, 6) → (batch, 4): grouped ``nn.Conv2d`` layers (groups 2 and 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.conv2 = nn.Conv2d(8, 8, 1, groups=4)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


class Gpt2StyleNet(nn.Module):
    """(batch, 5, 8) → (batch, 4): transformers ``Conv1D`` layers (weights stored (in, out), as in GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(24, 8)
        self.c_proj = Conv1D(8, 24)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():  # transformers initialises Conv1D with std 0.02 and zero bias: make them count
            for layer in (self.c_fc, self.c_proj):
                layer.weight.normal_(0, 0.3)
                layer.bias.normal_(0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c_proj(torch.relu(self.c_fc(x))).mean(dim=1))


class EmbeddingNet(nn.Module):
    """(batch, 6) token ids in [0, 20) → (batch, 4): token and position ``nn.Embedding`` layers."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(20, 8, padding_idx=0)
        self.wpe = nn.Embedding(6, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.head((self.wte(ids) + self.wpe(positions)).mean(dim=1))


class MhaNet(nn.Module):
    """(batch, 5, 8) → (batch, 4): a batch-first ``nn.MultiheadAttention`` (LoRA also adapts its out_proj)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out.mean(dim=1))


def seeded(cls: type[nn.Module]) -> object:
    """A builder ``seed -> model`` for ``cls`` in eval mode, bit-identical for one seed."""

    def build(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return cls().eval()

    return build
