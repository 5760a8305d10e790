"""The maths, shapes and init of each method on the layer types beyond Linear/Conv2d, against hand-written
formulas: LoRA on Embedding, transformers Conv1D, Conv1d/Conv3d, grouped convs and MultiheadAttention; LoHa
and LoKr on Conv1d; AdaLoRA on Conv1D; DoRA on Conv1D, ConvNd, grouped convs and Embedding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_kinds import Conv1dNet, Conv3dNet, EmbeddingNet, Gpt2StyleNet, GroupedConvNet
from torch import nn

import deltatune
from deltatune import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from deltatune.methods.dora import dora_grouped_row_norm
from deltatune.methods.lokr import lokr_delta_weight

RANDOM = {"init_lora_weights": False}


def seeded(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def test_lora_embedding_init_formula_and_keys() -> None:
    model = get_peft_model(seeded(EmbeddingNet), LoraConfig(target_modules=["wte"], r=4, lora_alpha=8))
    layer = model.base_model.model.wte
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert a.shape == (4, 20) and b.shape == (8, 4)
    assert torch.count_nonzero(a) == 0 and 0.5 < float(b.std()) < 1.5  # PEFT: A = 0, B ~ N(0, 1)
    with torch.no_grad():
        a.normal_()
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    expected = layer.base_layer(ids) + F.embedding(ids, a.t()) @ b.t() * 2.0
    torch.testing.assert_close(layer(ids), expected)
    torch.testing.assert_close(layer.delta_weight("default"), (b @ a).t() * 2.0)
    keys = set(deltatune.get_peft_model_state_dict(model))
    assert keys == {"base_model.model.wte.lora_embedding_A", "base_model.model.wte.lora_embedding_B"}
    with pytest.raises(ValueError, match="lora_bias=True is not supported for Embedding"):
        get_peft_model(seeded(EmbeddingNet), LoraConfig(target_modules=["wte"], lora_bias=True))


def test_lora_on_transformers_conv1d_is_fan_in_fan_out() -> None:
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        model = get_peft_model(seeded(Gpt2StyleNet), LoraConfig(target_modules=["c_fc"], r=2, **RANDOM))
    assert model.peft_config["default"].fan_in_fan_out is True
    layer = model.base_model.model.c_fc
    a, b = layer.factor_weights("default")
    assert a.shape == (2, 8) and b.shape == (24, 2) and layer.base_weight.shape == (8, 24)
    delta = layer.delta_weight("default")
    torch.testing.assert_close(delta, (b @ a).t() * 4.0)  # stored (in, out) like the base weight
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), x @ (layer.base_weight + delta) + layer.base_bias)


@pytest.mark.parametrize("cls", [Conv1dNet, Conv3dNet])
def test_lora_conv_nd_delta_is_the_factor_product(cls: type[nn.Module]) -> None:
    model = get_peft_model(seeded(cls), LoraConfig(target_modules=["conv1"], r=3, lora_alpha=6, **RANDOM))
    layer = model.base_model.model.conv1
    a, b = layer.factor_weights("default")
    delta = torch.einsum("or,ri...->oi...", b.flatten(1), a) * 2.0
    torch.testing.assert_close(layer.delta_weight("default"), delta)
    x = torch.randn(2, *([2, 4, 4, 4] if cls is Conv3dNet else [3, 10]))
    torch.testing.assert_close(
        layer(x), layer.base_layer._conv_forward(x, layer.base_weight + delta, layer.base_bias)
    )


def test_lora_grouped_conv_forward_and_no_merge() -> None:
    model = get_peft_model(seeded(GroupedConvNet), LoraConfig(target_modules=["conv1"], r=4, **RANDOM))
    layer = model.base_model.model.conv1
    assert layer.lora_B["default"].groups == 2 and layer.lora_A["default"].groups == 1
    x = torch.randn(2, 4, 6, 6)
    lora = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    torch.testing.assert_close(layer(x), layer.base_layer(x) + lora)
    assert not layer.mergeable
    with pytest.raises(NotImplementedError, match="groups > 1"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="divisible by groups"):
        get_peft_model(seeded(GroupedConvNet), LoraConfig(target_modules=["conv1"], r=3))


@pytest.mark.parametrize("batch_first", [True, False])
def test_lora_mha_uses_adapted_weights_and_leaves_the_module_alone(batch_first: bool) -> None:
    torch.manual_seed(0)
    base = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    reference = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    reference.load_state_dict(base.state_dict())
    model = get_peft_model(nn.Sequential(base), LoraConfig(target_modules=["0"], r=2, **RANDOM))
    layer = model.base_model.model[0]
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        reference.in_proj_weight += layer.delta_weight("default")
        reference.out_proj.weight += layer.base_layer.out_proj.delta_weight("default")
    out, _ = layer(x, x, x)
    torch.testing.assert_close(out, reference(x, x, x)[0], atol=1e-6, rtol=1e-6)
    out.square().sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad} and len(trained) == 4
    assert "in_proj_weight" not in base.__dict__ and "weight" not in base.out_proj.base_layer.__dict__
    assert isinstance(base.in_proj_weight, nn.Parameter) and not base.in_proj_weight.requires_grad
    with pytest.raises(ValueError, match="Only same embed"):
        get_peft_model(nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4)), LoraConfig(target_modules=["0"]))


@pytest.mark.parametrize("effective", [False, True])
def test_loha_conv1d(effective: bool) -> None:
    config = LoHaConfig(
        target_modules=["conv1"], r=2, alpha=4, use_effective_conv2d=effective, init_weights=False
    )
    layer = get_peft_model(seeded(Conv1dNet), config).base_model.model.conv1
    p = {n: getattr(layer, n)["default"] for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    if effective:
        t1, t2 = layer.hada_t1["default"], layer.hada_t2["default"]
        assert t1.shape == (2, 2, 3, 1) and p["hada_w1_a"].shape == (2, 8) and p["hada_w1_b"].shape == (2, 3)
        rebuild = [
            torch.einsum("ijk,jq,ip->pqk", t[..., 0], p[f"hada_w{i}_b"], p[f"hada_w{i}_a"])
            for i, t in ((1, t1), (2, t2))
        ]
        expected = rebuild[0] * rebuild[1] * 2.0
    else:
        assert p["hada_w1_a"].shape == (8, 2) and p["hada_w1_b"].shape == (2, 9)
        expected = ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * 2.0).reshape(
            8, 3, 3
        )
    torch.testing.assert_close(layer.delta_weight("default"), expected)
    x = torch.randn(2, 3, 10)
    torch.testing.assert_close(
        layer(x), F.conv1d(x, layer.base_weight + expected, layer.base_bias, padding=1)
    )


def test_lokr_conv1d_shapes_and_peft_kron_layout() -> None:
    full = get_peft_model(seeded(Conv1dNet), LoKrConfig(target_modules=["conv1"], r=8, init_weights=False))
    layer = full.base_model.model.conv1
    w1, w2 = layer.lokr_w1["default"], layer.lokr_w2["default"]
    assert w1.shape == (2, 1) and w2.shape == (4, 3, 3)  # out 8 = 2·4, in 3 = 1·3, full 3-D w2 (b, d, k)
    # PEFT's layout: kron of a 2-D and a 3-D tensor (w1 taken as (1, a, c)), then reshaped to the kernel.
    expected = (torch.kron(w1, w2) * layer.scaling["default"]).reshape(8, 3, 3)
    torch.testing.assert_close(layer.delta_weight("default"), expected)
    assert not torch.allclose(
        expected, (torch.kron(w1[..., None], w2) * layer.scaling["default"]).reshape(8, 3, 3)
    )
    torch.testing.assert_close(lokr_delta_weight(w1, w2, layer.scaling["default"], (8, 3, 3)), expected)
    cp = get_peft_model(
        seeded(Conv1dNet), LoKrConfig(target_modules=["conv1"], r=1, use_effective_conv2d=True)
    )
    cp_layer = cp.base_model.model.conv1
    assert cp_layer.lokr_t2["default"].shape == (1, 1, 3, 1) and cp_layer.delta_weight("default").shape == (
        8,
        3,
        3,
    )


def test_adalora_on_transformers_conv1d() -> None:
    config = AdaLoraConfig(target_modules=["c_fc"], init_r=3, target_r=1, total_step=10, **RANDOM)
    layer = get_peft_model(seeded(Gpt2StyleNet), config).base_model.model.c_fc
    a, e, b = (getattr(layer, n)["default"] for n in ("lora_A", "lora_E", "lora_B"))
    assert a.shape == (3, 8) and b.shape == (24, 3)
    delta = (b @ (a * e)).t() * (8 / (3 + 1e-5))
    torch.testing.assert_close(layer.delta_weight("default"), delta)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(
        layer(x), x @ (layer.base_weight + delta) + layer.base_bias, atol=1e-4, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("cls", "target", "shape"),
    [
        (Gpt2StyleNet, "c_fc", (24,)),
        (Conv1dNet, "conv1", (1, 8, 1)),
        (Conv3dNet, "conv1", (1, 6, 1, 1, 1)),
        (EmbeddingNet, "wte", (8,)),
    ],
)
def test_dora_magnitudes_on_new_layer_types(
    cls: type[nn.Module], target: str, shape: tuple[int, ...]
) -> None:
    model = get_peft_model(seeded(cls), LoraConfig(target_modules=[target], r=2, use_dora=True))
    layer = getattr(model.base_model.model, target)
    magnitude = layer.lora_magnitude_vector["default"]
    assert tuple(magnitude.shape) == shape
    weight = layer.base_weight
    if cls is Gpt2StyleNet:
        norm = weight.t().norm(dim=1)  # PEFT's (out, in) rows of a Conv1D
    elif cls is EmbeddingNet:
        norm = weight.norm(dim=0)  # one per embedding dimension, over the vocabulary
    else:
        norm = weight.flatten(1).norm(dim=1)
    torch.testing.assert_close(magnitude.detach().reshape(-1), norm)  # B = 0 at init: ‖W‖


def test_dora_grouped_row_norm_is_the_norm_of_the_ungrouped_kernel() -> None:
    torch.manual_seed(0)
    weight, a, b = torch.randn(8, 2, 3, 3), torch.randn(4, 4, 3, 3), torch.randn(8, 2, 1, 1)
    dense = torch.zeros(8, 4, 3, 3)  # the grouped kernel as a full one: block diagonal over 2 groups
    dense[:4, :2], dense[4:, 2:] = weight[:4], weight[4:]
    b_full = torch.zeros(8, 4)  # the grouped 1×1 conv B as a full matrix
    b_full[:4, :2], b_full[4:, 2:] = b[:4, :, 0, 0], b[4:, :, 0, 0]
    delta = torch.einsum("or,rikl->oikl", b_full, a) * 0.5
    expected = (dense + delta).flatten(1).norm(dim=1)
    torch.testing.assert_close(dora_grouped_row_norm(weight, a, b, 2, 0.5), expected)


def test_all_linear_includes_transformers_conv1d_but_not_the_head() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear", r=2))
    names = peft_model.targeted_module_names
    assert names == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
