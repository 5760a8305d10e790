"""PEFT's LoRA-variant API on deltatune's layers: aLoRA's offset functions, DoRA's magnitude modules (``.weight``)
and the variant protocol (``lora_variants`` / ``resolve_lora_variant``), compared with peft where it has them."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.alora import (
    calculate_alora_offsets,
    get_alora_offsets_for_forward,
    get_alora_offsets_for_generate,
)

peft = pytest.importorskip("peft")
from peft.tuners.lora import variants as peft_variants  # noqa: E402


# ---- aLoRA's offsets --------------------------------------------------------------------------------
class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.linear = nn.Linear(8, 10)

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):  # type: ignore[no-untyped-def]
        return self.linear(self.embed(input_ids) if inputs_embeds is None else inputs_embeds)


ROWS = [[0, 1, 2, 3, 1, 2, 4], [1, 2, 0, 0, 0, 0, 0], [5, 5, 5, 5, 5, 1, 2], [0, 0, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize(
    "tokens, adapter_names",
    [
        ([1, 2], None),
        ([3], None),
        ([7, 8], None),
        ([1, 2], ["a", "b", "__base__", "a"]),
        ([1], ["b", "x", "a", "a"]),
    ],
)
def test_calculate_alora_offsets_as_peft(tokens: list[int], adapter_names: list[str] | None) -> None:
    ids = torch.tensor(ROWS)
    ours = {"a": dt.LoraConfig(alora_invocation_tokens=tokens, task_type="CAUSAL_LM"), "b": dt.LoraConfig()}
    theirs = {
        "a": peft.LoraConfig(alora_invocation_tokens=tokens, task_type="CAUSAL_LM"),
        "b": peft.LoraConfig(),
    }
    with warnings.catch_warnings(record=True) as ours_warned:
        warnings.simplefilter("always")
        got = calculate_alora_offsets(ours, "a", ids, adapter_names=adapter_names)
    with warnings.catch_warnings(record=True) as theirs_warned:
        warnings.simplefilter("always")
        want = peft_variants.calculate_alora_offsets(theirs, "a", ids, adapter_names=adapter_names)
    assert got == want
    assert [str(w.message) for w in ours_warned] == [str(w.message) for w in theirs_warned]
    assert calculate_alora_offsets(ours, "a", None) == []


def test_alora_offsets_for_forward_and_generate() -> None:
    torch.manual_seed(0)
    config = dt.LoraConfig(
        target_modules=["linear"], alora_invocation_tokens=[2], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = dt.get_peft_model(TinyLM(), config).eval()
    ids = torch.tensor([[0, 1, 2, 3], [0, 1, 1, 1]])
    kwargs = get_alora_offsets_for_forward(model, ids, foo=1)
    assert kwargs == {"foo": 1, "alora_offsets": [2, None]}
    with torch.no_grad():
        adapted = model(input_ids=ids)
        with model.disable_adapter():
            base = model(input_ids=ids)
    assert torch.equal(adapted[0, :2], base[0, :2]) and not torch.allclose(adapted[0, 2:], base[0, 2:])
    assert torch.equal(adapted[1], base[1])
    # an explicit value is kept; positional input_ids for generate; a 1-D prompt is one row
    assert get_alora_offsets_for_forward(model, ids, alora_offsets=[1, 1]) == {"alora_offsets": [1, 1]}
    assert get_alora_offsets_for_generate(model, ids) == {"alora_offsets": [2, None]}
    assert get_alora_offsets_for_generate(model, input_ids=ids[0])["alora_offsets"] == [2]
    with pytest.warns(UserWarning, match="only inputs_embeds are provided"):
        assert get_alora_offsets_for_forward(model, inputs_embeds=torch.ones(1, 4, 8)) == {
            "alora_offsets": None
        }
    with pytest.warns(UserWarning, match="during generate as input_ids are not available"):
        assert (
            get_alora_offsets_for_generate(model, inputs_embeds=torch.ones(1, 4, 8))["alora_offsets"] is None
        )
    # without an aLoRA adapter in the batch the arguments are left as they are
    model.add_adapter("plain", dt.LoraConfig(target_modules=["linear"]))
    model.set_adapter("plain")
    assert get_alora_offsets_for_forward(model, ids) == {}
    assert get_alora_offsets_for_forward(model, ids, adapter_names=["default", "__base__"]) == {
        "adapter_names": ["default", "__base__"],
        "alora_offsets": [2, None],
    }


# ---- DoRA's magnitude as PEFT's code reads it ----------------------------------------------------------
class ConvMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.lin = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(x).transpose(1, 2)).transpose(1, 2)
        return self.lin(h).sum(1)


def dora_pair() -> tuple[nn.Module, nn.Module]:
    kw = {"target_modules": ["emb", "conv", "lin"], "use_dora": True, "init_lora_weights": False}
    torch.manual_seed(0)
    theirs = peft.get_peft_model(ConvMLP(), peft.LoraConfig(**kw))
    torch.manual_seed(0)
    ours = dt.get_peft_model(ConvMLP(), dt.LoraConfig(**kw))
    return theirs, ours


def test_dora_magnitude_weight_is_the_layer_s_tensor_as_in_peft(tmp_path) -> None:  # type: ignore[no-untyped-def]
    theirs, ours = dora_pair()
    x = torch.randint(0, 12, (3, 5))
    ours.load_state_dict(
        {k.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default"): v
         for k, v in theirs.state_dict().items()}
    )  # fmt: skip
    for model in (theirs, ours):
        model(x).sum().backward()
    for name in ("emb", "conv", "lin"):
        mine, peft_s = (
            getattr(m.base_model.model, name).lora_magnitude_vector["default"] for m in (ours, theirs)
        )
        assert mine.weight is mine and isinstance(mine, nn.Parameter)
        torch.testing.assert_close(mine.weight.grad, peft_s.weight.grad)
        with (
            torch.no_grad()
        ):  # in place, through PEFT's spelling: the layer's output follows, in both libraries
            mine.weight.add_(0.25)
            peft_s.weight.add_(0.25)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    # state_dict() has PEFT's key (the parameter itself is named ``…default``); the saved file PEFT's saved key
    assert "base_model.model.lin.lora_magnitude_vector.default.weight" in ours.state_dict()
    ours.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.lin.lora_magnitude_vector" in saved


def test_dora_magnitude_keeps_its_kind_through_moves_copies_and_loads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import copy

    from deltatune.methods._dora_magnitude import DoraMagnitude

    _, ours = dora_pair()
    ours.save_pretrained(tmp_path)

    def magnitudes(model: nn.Module) -> list[nn.Parameter]:
        return [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]

    assert len(magnitudes(ours)) == 3
    ours.to(torch.float64)
    state = ours.state_dict()
    clone = copy.deepcopy(ours)
    clone.load_state_dict(state, assign=True)
    torch.manual_seed(0)  # the base model of dora_pair
    loaded = dt.PeftModel.from_pretrained(ConvMLP(), tmp_path, low_cpu_mem_usage=True)
    for model in (ours, clone, loaded):
        assert all(type(p) is DoraMagnitude and p.weight is p for p in magnitudes(model))
    with torch.no_grad():
        x = torch.randint(0, 12, (2, 4))
        torch.testing.assert_close(loaded(x).double(), ours(x), rtol=1e-5, atol=1e-5)


def _torch_round_trip(model: nn.Module) -> nn.Module:
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _keep_vars_weights_only(model: nn.Module) -> nn.Module:
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(keep_vars=True), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # the rebuild function is a safe global
    model.load_state_dict(state, assign=True)
    return model


def _swapped(convert):  # type: ignore[no-untyped-def]
    def run(model: nn.Module) -> nn.Module:
        previous = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            return convert(model)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(previous)

    return run


@pytest.mark.parametrize(
    ("convert", "same_objects"),
    [
        (_torch_round_trip, False),
        (lambda m: __import__("pickle").loads(__import__("pickle").dumps(m)), False),
        (lambda m: __import__("copy").deepcopy(m), False),
        (_keep_vars_weights_only, False),
        (_swapped(lambda m: m.half()), True),
        (_swapped(lambda m: m.to(torch.float64)), True),
        (lambda m: m.half(), True),
    ],
    ids=["torch.save", "pickle", "deepcopy", "keep_vars-weights_only", "swap-half", "swap-to", "half"],
)
def test_dora_magnitude_survives_serialisation_copies_and_conversions(convert, same_objects) -> None:  # type: ignore[no-untyped-def]
    """nn.Parameter rebuilds a plain parameter when pickled, and torch's swap-on-conversion swaps the class
    out: PEFT's ``lora_magnitude_vector[name].weight`` must still answer, on the same object where torch keeps
    the parameter's identity, its gradient kept."""
    from deltatune.methods._dora_magnitude import DoraMagnitude

    _, model = dora_pair()
    x = torch.randint(0, 12, (2, 4))
    model(x).sum().backward()
    layers = [getattr(model.base_model.model, name) for name in ("emb", "conv", "lin")]
    before = [layer.lora_magnitude_vector["default"] for layer in layers]
    grads = [p.grad.clone() for p in before]
    with torch.no_grad():
        expected = model(x)
    converted = convert(model)
    for name, old, grad in zip(("emb", "conv", "lin"), before, grads, strict=True):
        param = getattr(converted.base_model.model, name).lora_magnitude_vector["default"]
        assert type(param) is DoraMagnitude and param.weight is param and param.requires_grad
        assert (param is old) == same_objects
        if same_objects:
            torch.testing.assert_close(param.grad, grad.to(param.dtype))
    with torch.no_grad():
        got = converted(x)
    torch.testing.assert_close(got.double(), expected.double(), rtol=2e-2, atol=2e-2)


# ---- the variant protocol ------------------------------------------------------------------------------
from transformers.pytorch_utils import Conv1D  # noqa: E402

from deltatune.methods._dora_layer import DoraEmbeddingLayer, DoraLayer  # noqa: E402
from deltatune.methods._lora_base import LoraLayerBase  # noqa: E402
from deltatune.methods._lora_kinds import LoraEmbeddingLayer, LoraMultiheadAttentionLayer  # noqa: E402
from deltatune.methods._lora_layer import LoraLayer  # noqa: E402
from deltatune.methods._lora_variants import declared_variants, requested_variants  # noqa: E402

VARIANT_OPTIONS = {
    "alora_invocation_tokens": {"alora_invocation_tokens": [1], "task_type": "CAUSAL_LM"},
    "kasa_config": {"kasa_config": dt.KasaConfig()},
    "mica": {"init_lora_weights": "mica"},
    "use_bdlora": {"use_bdlora": dt.BdLoraConfig(target_modules_bd_a=["x"])},
    "use_dora": {"use_dora": True},
}


def test_variant_fields_are_tagged_as_in_peft() -> None:
    import dataclasses

    ours = declared_variants(dt.LoraConfig())
    assert ours == set(VARIANT_OPTIONS)
    peft_fields = {f.name: f.metadata for f in dataclasses.fields(peft.LoraConfig)}
    for name in ours:
        tagged = peft_fields.get(name, {}).get("is_lora_variant") or name in peft_fields[
            "init_lora_weights"
        ].get("lora_variants", [])
        assert tagged, name
    for name, options in VARIANT_OPTIONS.items():
        assert requested_variants(dt.LoraConfig(**options)) == (name,)
    assert requested_variants(dt.LoraConfig()) == ()


@pytest.mark.parametrize(
    "base",
    [nn.Linear(6, 4), Conv1D(4, 6), nn.Conv2d(2, 4, 3), nn.Embedding(8, 4), nn.MultiheadAttention(4, 2)],
)
@pytest.mark.parametrize("variant", sorted(VARIANT_OPTIONS))
def test_each_kind_s_variants_are_what_the_tuner_builds(base: nn.Module, variant: str) -> None:
    """A kind's ``lora_variants`` and the registry (which builds the layers) agree: the resolved class is the
    layer class the method of that config uses for the module; an unlisted variant is refused."""
    config = dt.LoraConfig(**VARIANT_OPTIONS[variant])
    kind = dt.get_method("lora").layer_class_for(base)(base)
    assert isinstance(kind, LoraLayerBase)
    if (variant,) not in kind.lora_variants:
        with pytest.raises(ValueError, match="Invalid or unsupported variant combination"):
            kind.resolve_lora_variant(config=config)
        return
    resolved = kind.resolve_lora_variant(config=config)
    assert (resolved or type(kind)) is dt.spec_for(config).layer_class_for(base)


def test_a_layer_built_by_hand_takes_its_variant() -> None:
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(6, 4), "default", dt.LoraConfig(use_dora=True, r=2))
    assert type(layer) is DoraLayer and layer.r == {"default": 2}
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # B = 0 and m = ‖W‖ at initialisation
    layer.add_adapter("plain", dt.LoraConfig().target_spec("", []))  # plain LoRA joins, as in PEFT
    assert layer.adapter_names == ["default", "plain"] and not layer.is_dora("plain")
    embedding = LoraEmbeddingLayer(nn.Embedding(8, 4))
    embedding.add_adapter("default", dt.LoraConfig(use_dora=True).target_spec("", []))
    assert type(embedding) is DoraEmbeddingLayer
    with pytest.raises(ValueError, match=r"\('use_dora',\) for lora.MultiheadAttention; it supports \(\)"):
        LoraMultiheadAttentionLayer(nn.MultiheadAttention(4, 2)).add_adapter(
            "default", dt.LoraConfig(use_dora=True).target_spec("", [])
        )
    with pytest.raises(ValueError, match="kasa_config supports Linear and Conv1D layers, not Conv2d"):
        LoraLayer(nn.Conv2d(2, 4, 3), "default", dt.LoraConfig(kasa_config=dt.KasaConfig()))
    kasa = LoraLayer(nn.Linear(6, 4), "default", dt.LoraConfig(kasa_config=dt.KasaConfig(), r=2))
    with pytest.raises(ValueError, match="holds KasaLayer adapters; a DoraLayer adapter cannot join"):
        kasa.add_adapter("dora", dt.LoraConfig(use_dora=True).target_spec("", []))


class PlainOnly(LoraLayer):
    """A kind that supports no variant (the extension point: a layer lists what it supports)."""

    @property
    def lora_variants(self):  # type: ignore[no-untyped-def]
        return {(): None}


@pytest.mark.parametrize(
    "table, message",
    [
        ({("fake_unregistered_variant",): None}, "found in lora_variants"),
        ({("use_dora",): None}, "Invalid or unsupported variant combination"),
        ({("use_dora", "use_bdlora"): None}, "must be sorted tuples"),
    ],
)
def test_resolve_refuses_what_peft_refuses(table: dict, message: str) -> None:  # type: ignore[type-arg]
    from unittest.mock import PropertyMock, patch

    from peft.tuners.lora.layer import Linear as PeftLinear

    ours = LoraLayer(nn.Linear(10, 10), "default", dt.LoraConfig(), r=8, lora_alpha=8)
    theirs = PeftLinear(nn.Linear(10, 10), "default", config=peft.LoraConfig(), r=8, lora_alpha=8)
    for layer, config in ((ours, dt.LoraConfig()), (theirs, peft.LoraConfig())):
        with patch.object(type(layer), "lora_variants", new_callable=PropertyMock) as variants:
            variants.return_value = table
            with pytest.raises(ValueError, match=message):
                layer.resolve_lora_variant(config=config)
    with pytest.raises(ValueError, match=r"Invalid or unsupported variant combination: \('use_dora',\)"):
        PlainOnly(nn.Linear(4, 4), "default", dt.LoraConfig(use_dora=True))
