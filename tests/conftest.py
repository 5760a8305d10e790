"""Shared test helpers: tiny models built from code (no network), per-method configs and small utilities.

Model kinds, one per layer type (``MODEL_KINDS``):

- ``mlp``: ``fc1``/``fc2`` Linear layers and a ``head`` (the ``modules_to_save`` entry);
- ``conv``: ``conv1`` (3×3), ``conv2`` (1×1) and ``conv3`` (3×3, stride 2) Conv2d layers and a ``head``;
- ``vit``: a two-layer random ViT (transformers 5 names its attention ``q_proj``/``v_proj``);
- ``conv1d``, ``conv3d``, ``grouped`` (grouped Conv2d), ``gpt2`` (transformers ``Conv1D``), ``embedding``
  and ``mha`` (``nn.MultiheadAttention``): see ``layer_kinds.py``.

Each kind is rebuilt from a fixed seed, so two calls give bit-identical base weights (which is how the
interop tests compare a peft-wrapped and a deltatune-wrapped copy of the same model).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from layer_kinds import Conv1dNet, Conv3dNet, EmbeddingNet, Gpt2StyleNet, GroupedConvNet, MhaNet, seeded
from method_fixtures import example_kwargs, nonzero_init
from safetensors.torch import load_file
from tiny import TINY_VIT_CONFIG
from torch import nn
from transformers import ViTConfig, ViTForImageClassification
from transformers.pytorch_utils import Conv1D

import deltatune
import deltatune.config
from deltatune.layers import AdapterLayer


class MLP(nn.Module):
    """(batch, 16) → (batch, 4) through two hidden Linear layers and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class ConvNet(nn.Module):
    """(batch, 3, 8, 8) → (batch, 4): 3×3, 1×1 and strided 3×3 convs, global pooling and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 1)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv3(self.act(self.conv2(self.act(self.conv1(x))))))
        return self.head(h.mean(dim=(2, 3)))


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def make_convnet(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()


def make_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**TINY_VIT_CONFIG)).eval()


@dataclass(frozen=True)
class ModelKind:
    """A tiny model family: how to build it, what to target, the layer type it exercises and an input batch.

    ``token_ids`` > 0 makes the input integer ids in [0, token_ids) (embedding models).
    """

    name: str
    build: Callable[[int], nn.Module]
    targets: list[str]
    modules_to_save: list[str]
    input_shape: tuple[int, ...]
    layer_type: type[nn.Module] = nn.Linear
    token_ids: int = 0

    def inputs(self, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        if self.token_ids:
            return torch.randint(0, self.token_ids, self.input_shape, generator=gen)
        return torch.randn(*self.input_shape, generator=gen)


def _kind(
    name: str, build: Any, targets: list[str], shape: tuple[int, ...], layer: type, ids: int = 0
) -> ModelKind:
    return ModelKind(name, build, targets, ["head"], shape, layer, ids)


#: One line per model; methods run on the kinds whose ``layer_type`` their layer class supports.
MODEL_KINDS = {
    "mlp": ModelKind("mlp", make_mlp, ["fc1", "fc2"], ["head"], (5, 16)),
    "conv": ModelKind("conv", make_convnet, ["conv1", "conv2", "conv3"], ["head"], (2, 3, 8, 8), nn.Conv2d),
    "vit": ModelKind("vit", make_vit, ["q_proj", "v_proj"], ["classifier"], (2, 3, 32, 32)),
    "conv1d": _kind("conv1d", seeded(Conv1dNet), ["conv1", "conv2"], (2, 3, 10), nn.Conv1d),
    "conv3d": _kind("conv3d", seeded(Conv3dNet), ["conv1", "conv2"], (2, 2, 4, 4, 4), nn.Conv3d),
    "grouped": _kind("grouped", seeded(GroupedConvNet), ["conv1", "conv2"], (2, 4, 6, 6), nn.Conv2d),
    "gpt2": _kind("gpt2", seeded(Gpt2StyleNet), ["c_fc", "c_proj"], (2, 5, 8), Conv1D),
    "embedding": _kind("embedding", seeded(EmbeddingNet), ["wte", "wpe"], (2, 6), nn.Embedding, ids=20),
    "mha": _kind("mha", seeded(MhaNet), ["attn"], (2, 5, 8), nn.MultiheadAttention),
}


def supports(method: str, kind: str) -> bool:
    """Whether ``method``'s layers can wrap the layer type of model kind ``kind``."""
    return issubclass(MODEL_KINDS[kind].layer_type, deltatune.get_method(method).supported_layers)


def make_config(
    method: str,
    targets: list[str] | str,
    modules_to_save: list[str] | None = None,
    nonzero: bool = True,
    **overrides: Any,
) -> deltatune.config.TargetingConfig:
    """A deltatune config for ``method`` with the small ranks its registry entry suggests for tests
    (``example_kwargs``), made non-zero at init by its ``nonzero_init`` values (tests/method_fixtures.py)."""
    spec = deltatune.get_method(method)
    kwargs: dict[str, Any] = example_kwargs(method)
    if nonzero:
        kwargs.update(nonzero_init(method))
    kwargs.update(overrides)
    config = spec.make_config(target_modules=targets, modules_to_save=modules_to_save, **kwargs)
    assert isinstance(config, deltatune.config.TargetingConfig)
    return config


def make_peft_config(method: str, targets: list[str], modules_to_save: list[str] | None, **kw: Any) -> Any:
    """The same config for the ``peft`` oracle (non-zero init): the registry names peft's class, and the
    method's ``config_defaults`` (DoRA's ``use_dora=True``) are PEFT's own fields."""
    import peft

    spec = deltatune.get_method(method)
    kwargs: dict[str, Any] = {**spec.config_defaults, **example_kwargs(method), **nonzero_init(method), **kw}
    cls = getattr(peft, spec.peft_config_name)
    return cls(target_modules=targets, modules_to_save=modules_to_save, **kwargs)


#: LoRA's non-default initialisers, with the config values each needs in tests (``tau`` low: EVA converges fast).
LORA_INITS: dict[str, dict[str, Any]] = {
    "pissa": {},
    "olora": {},
    "orthogonal": {},
    "loftq": {"loftq_config": {"loftq_bits": 4}},
    "eva": {"eva_config": {"tau": 0.9}},
    "corda": {"corda_config": {"corda_method": "ipm"}},
}


def calibration_batches(kind: ModelKind, n: int = 4, rows: int = 32) -> list[torch.Tensor]:
    """``n`` input batches of ``rows`` rows for the data-driven initialisers (EVA, CorDA)."""
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(rows, *kind.input_shape[1:], generator=gen) for _ in range(n)]


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread within the block (EVA's many tiny SVDs crawl when two threads share a busy CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def prepared_base(kind: ModelKind, config: Any, seed: int = 0) -> nn.Module:
    """``kind``'s model, preprocessed by ``preprocess_corda`` when ``config`` asks for CorDA (deterministic, so
    a saved CorDA adapter loads on it)."""
    model = kind.build(seed)
    if getattr(config, "init_lora_weights", None) == "corda":
        batches = calibration_batches(kind)
        with one_thread():
            deltatune.preprocess_corda(model, config, run_model=lambda: [model(x) for x in batches])
    return model


def adapted_model(kind: ModelKind, config: Any, seed: int = 0) -> Any:
    """``get_peft_model`` on ``kind``'s model, with the data step of EVA (after) or CorDA (before) done."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="lora with eva initialization")
        model = deltatune.get_peft_model(prepared_base(kind, config, seed), config)
    if getattr(config, "init_lora_weights", None) == "eva":
        with one_thread():
            deltatune.initialize_lora_eva_weights(
                model,
                calibration_batches(kind),
                forward_fn=lambda m, x: m(x),
                prepare_model_inputs_fn=None,
                prepare_layer_inputs_fn=None,
                show_progress_bar=False,
            )
    return model


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output tensor (``.logits`` for transformers models), without gradients."""
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def perturb_modules_to_save(model: nn.Module, adapter_name: str = "default", seed: int = 3) -> None:
    """Adds noise to the trainable ``modules_to_save`` copies so they differ from the originals."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".modules_to_save.{adapter_name}." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def read_adapter(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, the safetensors tensors) of a saved adapter directory."""
    with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    return config, load_file(os.path.join(directory, "adapter_model.safetensors"))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


_OWN_INDUCTOR_CACHE: list[str] = []


def pytest_configure(config: Any) -> None:
    """torch.compile's inductor writes compiled kernels (.so files) into one cache folder per user; a second
    process compiling at the same moment (another test run, a user's job) can leave a half-written file that
    this run then loads ("invalid ELF header"). Each test process gets a cache of its own, shared by its
    tests and the processes they start, unless TORCHINDUCTOR_CACHE_DIR was chosen by whoever runs the tests
    (importing torch's inductor fills in the shared default, so that value counts as not chosen)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        _OWN_INDUCTOR_CACHE.append(tempfile.mkdtemp(prefix="deltatune-tests-inductor-"))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = _OWN_INDUCTOR_CACHE[0]


def pytest_unconfigure(config: Any) -> None:
    """Removes this process's own inductor cache (see :func:`pytest_configure`)."""
    for folder in _OWN_INDUCTOR_CACHE:
        shutil.rmtree(folder, ignore_errors=True)


_INIT_NAMES = ("uniform_", "normal_", "constant_", "zeros_", "ones_", "trunc_normal_", "kaiming_uniform_")


def _process_wide_build_state() -> dict[str, Any]:
    from transformers import PreTrainedModel

    state: dict[str, Any] = {f"torch.nn.init.{n}": getattr(torch.nn.init, n) for n in _INIT_NAMES}
    state["PreTrainedModel.tie_weights"] = PreTrainedModel.tie_weights
    state["PreTrainedModel.init_weights"] = PreTrainedModel.init_weights
    state["torch default dtype"] = torch.get_default_dtype()
    return state


@pytest.fixture(autouse=True)
def _model_builds_leave_no_trace() -> Iterator[None]:
    """transformers swaps process-wide state while it builds a model (``PreTrainedModel.tie_weights``,
    ``torch.nn.init``'s functions, the default dtype) and puts back what it found; a test that leaves any of it
    swapped breaks every later test of its process (two loads racing in two threads once left tying off, and
    the tied-embedding tests of another file failed). This fails the test that leaks, and repairs the state."""
    from transformers import PreTrainedModel

    before = _process_wide_build_state()
    yield
    after = _process_wide_build_state()
    changed = sorted(k for k in before if after[k] is not before[k])
    if changed:
        for key in changed:
            if key.startswith("torch.nn.init."):
                setattr(torch.nn.init, key.rsplit(".", 1)[1], before[key])
            elif key.startswith("PreTrainedModel."):
                setattr(PreTrainedModel, key.rsplit(".", 1)[1], before[key])
            else:
                torch.set_default_dtype(before[key])
        pytest.fail(f"this test left process-wide state changed: {', '.join(changed)}")
