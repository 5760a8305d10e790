"""PEFT's helpers ``disable_input_dtype_casting`` and ``DoraCaching`` (``deltatune.helpers``), and what they
rest on: the fast paths call ``lora_A``/``lora_B`` when those run hooks, and DoRA's cached norms are never
stale. PEFT's own cases (its test_helpers.py) are rebuilt here, and peft (the oracle) is compared where it
has the same behaviour."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODEL_KINDS, logits
from tiny import tiny_llama
from torch import nn

import deltatune
from deltatune import LoraConfig, get_peft_model
from deltatune.helpers import DoraCaching, disable_input_dtype_casting
from deltatune.methods import _lora_layer
from deltatune.methods._dora_layer import DoraEmbeddingLayer, DoraLayer
from deltatune.methods._lora_layer import LoraLayer

DTYPE_ERROR = r"expected m.*1 and m.*2 to have the same dtype"


@pytest.fixture(autouse=True)
def _caching_off() -> Iterator[None]:
    DoraCaching()(enabled=False)
    yield
    DoraCaching()(enabled=False)


# ---- disable_input_dtype_casting ---------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.lin0(x)))


@torch.no_grad()
def _to_fp32(module: nn.Module, inputs: Any) -> None:
    for param in module.parameters(recurse=False):
        param.data = param.data.float()


@torch.no_grad()
def _to_fp16(module: nn.Module, inputs: Any, output: Any) -> None:
    for param in module.parameters(recurse=False):
        param.data = param.data.half()


def _layerwise_casting_model(
    get_model: Any, config: Any, layer_type: type[nn.Module], record: list[torch.dtype]
) -> nn.Module:
    """PEFT's test model: fp16 storage, every module holding parameters cast to fp32 for its own forward
    (diffusers' layerwise casting, by hooks), and the adapter layers' output dtype recorded."""
    torch.manual_seed(0)
    model = get_model(MLP(), config).to(torch.float16)
    for module in model.modules():
        if sum(p.numel() for p in module.parameters()) > 0:
            module.register_forward_pre_hook(_to_fp32)
            module.register_forward_hook(_to_fp16)
        if isinstance(module, layer_type):
            module.register_forward_hook(lambda _m, _i, out: record.append(out[0].dtype))
    return model


def _casting_model(record: list[torch.dtype]) -> nn.Module:
    config = LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"])
    return _layerwise_casting_model(get_peft_model, config, LoraLayer, record)


def test_without_the_context_the_cast_input_meets_the_hooked_fp32_weight() -> None:
    with pytest.raises(RuntimeError, match=DTYPE_ERROR):
        _casting_model([])(torch.randn(4, 10))


def test_inside_the_context_the_input_keeps_its_dtype() -> None:
    record: list[torch.dtype] = []
    model = _casting_model(record)
    with disable_input_dtype_casting(model):
        out = model(torch.randn(4, 10))
    assert record == [torch.float32] and out.dtype == torch.float32


def test_an_inactive_context_changes_nothing() -> None:
    model = _casting_model([])
    with pytest.raises(RuntimeError, match=DTYPE_ERROR), disable_input_dtype_casting(model, active=False):
        model(torch.randn(4, 10))


def test_leaving_the_context_restores_each_layers_setting() -> None:
    model = _casting_model([])
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    with disable_input_dtype_casting(model):
        model(torch.randn(4, 10))
    with pytest.raises(RuntimeError, match=DTYPE_ERROR):
        model(torch.randn(4, 10))
    layer.cast_input_dtype_enabled = False  # a layer switched off by hand stays off after a context
    with pytest.raises(KeyError), disable_input_dtype_casting(model):
        with disable_input_dtype_casting(model):
            assert layer.cast_input_dtype_enabled is False
        raise KeyError("left by an exception")
    assert layer.cast_input_dtype_enabled is False


def test_peft_behaves_the_same() -> None:
    peft = pytest.importorskip("peft")
    from peft.helpers import disable_input_dtype_casting as peft_disable
    from peft.tuners.lora.layer import LoraLayer as PeftLoraLayer

    config = peft.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"])
    record: list[torch.dtype] = []
    theirs = _layerwise_casting_model(peft.get_peft_model, config, PeftLoraLayer, record)
    with pytest.raises(RuntimeError, match=DTYPE_ERROR):
        theirs(torch.randn(4, 10))
    theirs = _layerwise_casting_model(peft.get_peft_model, config, PeftLoraLayer, record)
    with peft_disable(theirs):
        theirs(torch.randn(4, 10))
    assert record == [torch.float32]


def _half_adapter(model: nn.Module, layer_type: type[nn.Module]) -> nn.Module:
    for module in model.modules():
        if isinstance(module, layer_type):
            for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
                for param in getattr(module, name, nn.ModuleDict()).parameters():
                    param.data = param.data.half()
    return model


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_without_hooks_an_uncast_input_meets_the_adapter_dtype_as_in_peft(
    use_dora: bool, train: bool
) -> None:
    """fp32 base, fp16 adapter, fp32 input: the cast makes it work; without it the adapter's product refuses
    the mixed dtypes (nothing reconciles them), in peft as here."""
    peft = pytest.importorskip("peft")
    from peft.helpers import disable_input_dtype_casting as peft_disable
    from peft.tuners.lora.layer import LoraLayer as PeftLoraLayer

    x = torch.randn(4, 10)
    for get_model, config_cls, layer_type, disable in (
        (get_peft_model, LoraConfig, LoraLayer, disable_input_dtype_casting),
        (peft.get_peft_model, peft.LoraConfig, PeftLoraLayer, peft_disable),
    ):
        torch.manual_seed(0)
        config = config_cls(target_modules=["lin0"], init_lora_weights=False, use_dora=use_dora)
        model = _half_adapter(get_model(MLP(), config), layer_type).train(train)
        assert model(x).dtype == torch.float32
        with pytest.raises(RuntimeError, match=DTYPE_ERROR), disable(model):
            model(x)


# ---- hooks on the adapter's submodules run on the fast paths --------------------------------------
def _with_hooks(use_dora: bool, dropout: float = 0.0) -> tuple[nn.Module, nn.Module, LoraLayer]:
    torch.manual_seed(0)
    config = LoraConfig(
        target_modules=["lin0"], init_lora_weights=False, use_dora=use_dora, lora_dropout=dropout
    )
    model = get_peft_model(MLP(), config)
    return model, copy.deepcopy(model), model.base_model.model.lin0


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_forward_hooks_on_lora_a_and_b_run(use_dora: bool, train: bool) -> None:
    model, reference, layer = _with_hooks(use_dora)
    model.train(train)
    reference.train(train)
    calls: list[str] = []
    layer.lora_A["default"].register_forward_pre_hook(lambda *_: calls.append("A pre"))
    layer.lora_B["default"].register_forward_hook(lambda *_: calls.append("B"))
    x = torch.randn(6, 10)
    torch.testing.assert_close(model(x), reference(x))
    assert calls == ["A pre", "B"]


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_global_module_hook_sees_the_adapter_modules(use_dora: bool) -> None:
    model, _, layer = _with_hooks(use_dora)
    seen: list[nn.Module] = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, *_: seen.append(m))
    try:
        model(torch.randn(6, 10))
    finally:
        handle.remove()
    assert layer.lora_A["default"] in seen and layer.lora_B["default"] in seen


def test_a_hook_that_changes_the_factor_output_takes_effect_with_dropout() -> None:
    model, _, layer = _with_hooks(use_dora=False, dropout=0.5)
    model.train()  # the fast path would apply dropout itself and read B's weight
    x = torch.randn(6, 10)
    base = layer.base_layer(x)
    layer.lora_B["default"].register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    torch.testing.assert_close(model.base_model.model.lin0(x), base)


@pytest.mark.parametrize("use_dora", [False, True])
def test_without_hooks_the_fused_path_is_taken(use_dora: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = _with_hooks(use_dora)
    name = "low_rank_gemms" if use_dora else "low_rank_linear"
    module = deltatune.methods._dora_layer if use_dora else _lora_layer
    calls: list[int] = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    model(torch.randn(6, 10))
    assert calls == [1]


# ---- DoraCaching ------------------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 5, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(5, 5, kernel_size=3, padding=1)
        self.linear = nn.Linear(5 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.linear(x.flatten(1))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(x))


def llama() -> nn.Module:
    return tiny_llama(tie=False).train()


CASES = {
    "llama": (llama, None, lambda: torch.arange(10).view(1, -1)),
    "llama-embedding": (llama, ["model.embed_tokens"], lambda: torch.arange(10).view(1, -1)),
    "linear": (MLP, ["lin0", "lin1"], lambda: torch.randn(4, 10)),
    "conv": (ConvNet, ["conv0", "conv1"], lambda: torch.randn(1, 3, 3, 3)),
    "embedding": (EmbeddingNet, ["emb", "lin"], lambda: torch.arange(10).view(1, -1)),
}


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _dora_model(case: str) -> tuple[nn.Module, torch.Tensor]:
    build, targets, inputs = CASES[case]
    torch.manual_seed(0)
    config = LoraConfig(init_lora_weights=False, use_dora=True, target_modules=targets)
    return get_peft_model(build(), config), inputs()


def _caches(model: nn.Module) -> list[dict[str, Any]]:
    return [module._dora_cache for module in model.modules() if hasattr(module, "_dora_cache")]


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_s_caching_sequence(case: str) -> None:
    """PEFT's TestDoraCaching.check_dora_caching, step by step."""
    torch.manual_seed(0)
    build, targets, inputs = CASES[case]
    x = inputs()
    base_model = build()
    base_result = _output(base_model, x)
    model = get_peft_model(
        base_model, LoraConfig(init_lora_weights=False, use_dora=True, target_modules=targets)
    )
    caches = _caches(model)
    dora_result = _output(model, x)
    assert not torch.allclose(base_result, dora_result, atol=1e-6, rtol=1e-6)
    assert caches and not any(caches)
    model.eval()
    with DoraCaching():
        cached = _output(model, x)
        assert all(caches)
    torch.testing.assert_close(cached, dora_result, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_output(model, x), dora_result, atol=1e-6, rtol=1e-6)
    assert not any(caches)  # a forward outside the context empties them
    model.train()
    with DoraCaching():
        torch.testing.assert_close(_output(model, x), dora_result, atol=1e-6, rtol=1e-6)
        assert not any(caches)  # nothing is cached in training
    DoraCaching()(enabled=True)
    _output(model, x)
    model.eval()
    assert not any(caches)
    torch.testing.assert_close(_output(model, x), dora_result, atol=1e-6, rtol=1e-6)
    assert all(caches)
    model.eval()  # eval() empties them too
    assert not any(caches)


def _count_norms(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for cls, name in ((DoraLayer, "_row_norm"), (DoraEmbeddingLayer, "_column_norm")):
        original = getattr(cls, name)

        def counted(self: Any, adapter_name: str, _original: Any = original) -> torch.Tensor:
            calls.append(adapter_name)
            return _original(self, adapter_name)

        monkeypatch.setattr(cls, name, counted)
    return calls


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_norms_are_reused_and_give_the_same_output(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _dora_model(case)
    model.eval()
    expected = logits(model, x)
    calls = _count_norms(monkeypatch)
    with DoraCaching():
        outs = [logits(model, x) for _ in range(3)]
    assert len(calls) == len(_caches(model))  # once per layer, then served from the caches
    for out in outs:
        assert torch.equal(out, expected)


def _edit(layer: Any, what: str) -> None:
    with torch.no_grad():
        if what == "in place":
            layer.factor_weights("default")[1].add_(0.5)
        elif what == "data assigned":
            b = layer.factor_weights("default")[1]
            b.data = b.data + 0.5  # a new storage, the same parameter
        elif what == "base weight":
            layer.base_weight.mul_(1.5)
        elif what == "scale":
            layer.scaling["default"] *= 2


@pytest.mark.parametrize("what", ["in place", "data assigned", "base weight", "scale"])
@pytest.mark.parametrize("case", ["linear", "embedding"])
def test_a_changed_input_of_the_norm_is_seen(case: str, what: str) -> None:
    model, x = _dora_model(case)
    model.eval()
    layer = next(m for m in model.modules() if isinstance(m, DoraLayer | DoraEmbeddingLayer))
    with DoraCaching():
        logits(model, x)
        _edit(layer, what)
        cached = logits(model, x)
    assert torch.equal(cached, logits(model, x))  # the same as computed afresh without caching


def test_merge_and_unmerge_are_seen() -> None:
    model, x = _dora_model("linear")
    model.eval()
    with DoraCaching():
        logits(model, x)
        model.merge_adapter()
        merged = logits(model, x)
        model.unmerge_adapter()
        cached = logits(model, x)
    torch.testing.assert_close(merged, cached, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached, logits(model, x))


def test_switching_loading_and_replacing_adapters_is_seen(tmp_path: Path) -> None:
    model, x = _dora_model("linear")
    config = LoraConfig(init_lora_weights=False, use_dora=True, target_modules=["lin0", "lin1"])
    torch.manual_seed(1)
    model.add_adapter("other", config)
    model.save_pretrained(tmp_path)
    model.eval()
    with DoraCaching():
        first = logits(model, x)
        model.set_adapter("other")
        other = logits(model, x)
        model.set_adapter("default")
        assert torch.equal(logits(model, x), first)
        model.delete_adapter("other")
        torch.manual_seed(2)
        model.add_adapter("other", config)
        model.set_adapter("other")
        model.eval()
        replaced = logits(model, x)
        model.load_adapter(tmp_path / "other", adapter_name="other")
        model.set_adapter("other")
        model.eval()
        loaded = logits(model, x)
    assert not torch.equal(replaced, other)
    assert torch.equal(loaded, other)
    assert torch.equal(loaded, logits(model, x))


def test_context_nesting_and_the_permanent_switch() -> None:
    model, x = _dora_model("linear")
    model.eval()
    caches = _caches(model)
    caching = DoraCaching()
    with caching:
        with DoraCaching(enabled=False):
            logits(model, x)
            assert not any(caches)
        logits(model, x)
        assert all(caches)
    logits(model, x)
    assert not any(caches)


def test_no_caching_in_training(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _dora_model("conv")
    calls = _count_norms(monkeypatch)
    with DoraCaching():
        model(x).sum().backward()  # gradients flow as without the context
        model(x)
    assert len(calls) == 4 and not any(_caches(model))


def test_a_model_with_filled_caches_copies_and_pickles(tmp_path: Path) -> None:
    model, x = _dora_model("linear")
    model.eval()
    with DoraCaching():
        expected = logits(model, x)
        clone = copy.deepcopy(model)
        assert all(_caches(model)) and not any(_caches(clone))
        torch.save(model, tmp_path / "model.pt")
        assert torch.equal(logits(clone, x), expected)


def test_caching_with_grad_and_inference_mode() -> None:
    model, x = _dora_model("linear")
    model.eval()
    with DoraCaching():
        with torch.inference_mode():
            ref = model(x)
        out = model(x)  # an inference-mode norm is not reused where autograd records
        out.sum().backward()
    torch.testing.assert_close(out, ref)
    magnitude = model.base_model.model.lin0.lora_magnitude_vector["default"]
    grad = magnitude.grad if isinstance(magnitude, torch.Tensor) else magnitude.weight.grad
    assert grad is not None and torch.isfinite(grad).all()


@pytest.mark.parametrize("kind_name", ["mlp", "conv"])
def test_cached_output_matches_peft_s_cached_output(kind_name: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from peft.helpers import DoraCaching as PeftDoraCaching

    kind = MODEL_KINDS[kind_name]
    torch.manual_seed(3)
    theirs = peft.get_peft_model(
        kind.build(0), peft.LoraConfig(target_modules=kind.targets, use_dora=True, init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path)
    ours = deltatune.PeftModel.from_pretrained(kind.build(0), tmp_path).eval()
    theirs.eval()
    x = torch.randn(*kind.input_shape)
    try:
        with PeftDoraCaching(), DoraCaching():
            for _ in range(2):
                torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-4)
    finally:
        PeftDoraCaching()(enabled=False)
