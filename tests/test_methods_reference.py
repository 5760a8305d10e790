"""Each method's maths against a hand computation (peft-format.md §1-§4).

ΔW of every method and layer form, the fast forward paths (values and gradients) against
``F.linear(x, ΔW)``, LoKr's factorisation table and shapes, and AdaLoRA's budget schedule, importance
EMAs, masking and orthogonal regulariser.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from deltatune import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from deltatune.methods.adalora import (
    RankAllocator,
    SVDLayer,
    adalora_delta_weight,
    budget_schedule,
    orthogonal_regularizer,
)
from deltatune.methods.loha import LoHaLayer, loha_delta_forward, loha_delta_weight
from deltatune.methods.lokr import factorization, lokr_delta_forward, lokr_delta_weight
from deltatune.methods.lora import LoraLayer, lora_delta_forward


class Single(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def wrap(layer: nn.Module, config: Any) -> Any:
    """The adapter layer that ``config`` puts around ``layer``."""
    torch.manual_seed(0)
    model = get_peft_model(Single(layer), dataclasses.replace(config, target_modules=["layer"]))
    return model.base_model.model.layer


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def kron_by_hand(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """ΔW[i·b + k, j·d + l, …] = w1[i, j] · w2[k, l, …]."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    out = torch.zeros(a * b, c * d, *w2.shape[2:])
    for i in range(a):
        for j in range(c):
            out[i * b : (i + 1) * b, j * d : (j + 1) * d] = w1[i, j] * w2
    return out


def cp_by_hand(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """rebuild[p, q, k, l] = Σ_ij t[i, j, k, l] · wb[j, q] · wa[i, p]."""
    r = t.shape[0]
    out = torch.zeros(wa.shape[1], wb.shape[1], *t.shape[2:])
    for i in range(r):
        for j in range(r):
            out += torch.outer(wa[i], wb[j])[:, :, None, None] * t[i, j]
    return out


def check_layer_matches(layer: Any, x: torch.Tensor, delta: torch.Tensor) -> None:
    """layer(x) == base(x) + base_op(x, ΔW) for the adapter layer in eval mode."""
    layer.eval()
    base = layer.base_layer
    with torch.no_grad():
        if isinstance(base, nn.Linear):
            expected = base(x) + F.linear(x, delta)
        else:
            expected = base(x) + F.conv2d(
                x, delta, None, base.stride, base.padding, base.dilation, base.groups
            )
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


# ---- LoRA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_delta_and_forward(use_rslora: bool) -> None:
    layer = wrap(
        nn.Linear(10, 7), LoraConfig(r=3, lora_alpha=6, use_rslora=use_rslora, init_lora_weights=False)
    )
    assert isinstance(layer, LoraLayer)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (3, 10) and b.shape == (7, 3)
    s = 6 / math.sqrt(3) if use_rslora else 6 / 3
    assert layer.scaling["default"] == pytest.approx(s)
    delta = (b @ a * s).detach()
    torch.testing.assert_close(layer.delta_weight("default"), delta)
    check_layer_matches(layer, rand(4, 10), delta)


def test_lora_forward_gradients_match_the_formula() -> None:
    layer = wrap(nn.Linear(12, 9), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    x = rand(2, 5, 12)
    g = rand(2, 5, 9, seed=1)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    (layer(x) * g).sum().backward()
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = layer.base_layer(x) + x @ (b_ref @ a_ref).t() * 2.0
    (ref * g).sum().backward()
    torch.testing.assert_close(a.grad, a_ref.grad)
    torch.testing.assert_close(b.grad, b_ref.grad)
    torch.testing.assert_close(lora_delta_forward(x, a, b, 2.0), F.linear(x, b @ a) * 2.0)


@pytest.mark.parametrize("conv_kwargs", [{"padding": 1}, {"stride": 2, "padding": 2, "dilation": 2}])
def test_lora_conv_delta_and_forward(conv_kwargs: dict[str, int]) -> None:
    layer = wrap(nn.Conv2d(4, 6, 3, **conv_kwargs), LoraConfig(r=2, lora_alpha=3, init_lora_weights=False))
    a = layer.lora_A["default"].weight.detach()  # (r, in, 3, 3)
    b = layer.lora_B["default"].weight.detach()  # (out, r, 1, 1)
    assert a.shape == (2, 4, 3, 3) and b.shape == (6, 2, 1, 1)
    expected = torch.zeros(6, 4, 3, 3)
    for o in range(6):
        for k in range(2):
            expected[o] += b[o, k, 0, 0] * a[k]
    expected *= 1.5
    torch.testing.assert_close(layer.delta_weight("default"), expected)
    check_layer_matches(layer, rand(2, 4, 9, 9), expected)


def test_lora_conv_1x1_delta() -> None:
    layer = wrap(nn.Conv2d(5, 3, 1), LoraConfig(r=2, lora_alpha=2, init_lora_weights=False))
    a = layer.lora_A["default"].weight.detach()[:, :, 0, 0]
    b = layer.lora_B["default"].weight.detach()[:, :, 0, 0]
    torch.testing.assert_close(layer.delta_weight("default"), (b @ a).view(3, 5, 1, 1))


def test_lora_init_modes() -> None:
    default = wrap(nn.Linear(8, 8), LoraConfig(r=4))
    assert torch.count_nonzero(default.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(8)
    assert default.lora_A["default"].weight.abs().max() <= bound
    gaussian = wrap(nn.Linear(64, 64), LoraConfig(r=2, init_lora_weights="gaussian"))
    assert torch.count_nonzero(gaussian.lora_B["default"].weight) == 0
    assert float(gaussian.lora_A["default"].weight.detach().std()) == pytest.approx(0.5, rel=0.15)


def test_lora_bias_merges_into_the_base_bias() -> None:
    layer = wrap(nn.Linear(6, 4), LoraConfig(r=2, lora_alpha=4, lora_bias=True, init_lora_weights=False))
    x = rand(3, 6)
    before_bias = layer.base_layer.bias.detach().clone()
    layer.eval()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        expected = before_bias + 2.0 * layer.lora_B["default"].bias
        torch.testing.assert_close(layer.base_layer.bias, expected)
        torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=1e-6)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.bias, before_bias, atol=1e-7, rtol=0.0)


# ---- LoHa ---------------------------------------------------------------------------------------
def test_loha_linear_delta() -> None:
    layer = wrap(nn.Linear(10, 6), LoHaConfig(r=3, alpha=6, init_weights=False))
    assert isinstance(layer, LoHaLayer)
    w1a, w1b = layer.hada_w1_a["default"], layer.hada_w1_b["default"]
    w2a, w2b = layer.hada_w2_a["default"], layer.hada_w2_b["default"]
    assert (w1a.shape, w1b.shape, w2a.shape, w2b.shape) == ((6, 3), (3, 10), (6, 3), (3, 10))
    expected = ((w1a @ w1b) * (w2a @ w2b) * 2.0).detach()
    torch.testing.assert_close(layer.delta_weight("default"), expected)
    check_layer_matches(layer, rand(4, 10), expected)


def test_loha_default_init_zeroes_w2b_only() -> None:
    layer = wrap(nn.Linear(10, 6), LoHaConfig(r=3))
    assert torch.count_nonzero(layer.hada_w2_b["default"]) == 0
    for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
        assert torch.count_nonzero(getattr(layer, name)["default"]) > 0


def test_loha_conv_plain_delta() -> None:
    layer = wrap(nn.Conv2d(4, 5, 3, padding=1), LoHaConfig(r=2, alpha=2, init_weights=False))
    w1a, w1b = layer.hada_w1_a["default"], layer.hada_w1_b["default"]
    w2a, w2b = layer.hada_w2_a["default"], layer.hada_w2_b["default"]
    assert w1a.shape == (5, 2) and w1b.shape == (2, 36)
    expected = ((w1a @ w1b) * (w2a @ w2b)).detach().view(5, 4, 3, 3)
    torch.testing.assert_close(layer.delta_weight("default"), expected)
    check_layer_matches(layer, rand(2, 4, 6, 6), expected)


def test_loha_conv_cp_delta() -> None:
    config = LoHaConfig(r=2, alpha=4, use_effective_conv2d=True, init_weights=False)
    layer = wrap(nn.Conv2d(4, 5, 3, padding=1), config)
    p = {n: getattr(layer, n)["default"].detach() for n in layer.adapter_param_names}
    # The CP form's a-factors are (r, out), the b-factors (r, in) and the cores (r, r, k, k).
    assert p["hada_w1_a"].shape == (2, 5) and p["hada_w1_b"].shape == (2, 4)
    assert p["hada_t1"].shape == (2, 2, 3, 3) and p["hada_t2"].shape == (2, 2, 3, 3)
    rebuild1 = cp_by_hand(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
    rebuild2 = cp_by_hand(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    expected = rebuild1 * rebuild2 * 2.0
    torch.testing.assert_close(layer.delta_weight("default"), expected, atol=1e-6, rtol=1e-5)
    check_layer_matches(layer, rand(2, 4, 6, 6), expected)
    # A 1×1 conv never takes the CP form.
    one = wrap(nn.Conv2d(4, 5, 1), LoHaConfig(r=2, use_effective_conv2d=True))
    assert "default" not in one.hada_t1 and one.hada_w1_a["default"].shape == (5, 2)


@pytest.mark.parametrize("with_mask", [False, True])
def test_loha_fast_path_equals_materialised(with_mask: bool) -> None:
    factors = [rand(9, 3, seed=1), rand(3, 7, seed=2), rand(9, 2, seed=3), rand(2, 7, seed=4)]
    leaves = [f.clone().requires_grad_() for f in factors]
    refs = [f.clone().requires_grad_() for f in factors]
    x = rand(2, 4, 7, seed=5)
    mask = (rand(9, seed=6) > 0).float() if with_mask else None
    y = loha_delta_forward(x, *leaves, 0.5, mask)
    delta = loha_delta_weight(*refs, 0.5, (9, 7))
    if mask is not None:
        delta = delta * mask[:, None]
    y_ref = F.linear(x, delta)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = rand(*y.shape, seed=7)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for leaf, ref in zip(leaves, refs, strict=True):
        torch.testing.assert_close(leaf.grad, ref.grad, atol=1e-4, rtol=1e-5)


def test_loha_layer_fast_path_is_used_and_exact() -> None:
    # r = 2 on 64×64: r² (in+out) = 512 < in·out = 4096, so the Khatri-Rao path runs.
    layer = wrap(nn.Linear(64, 64), LoHaConfig(r=2, alpha=2, init_weights=False))
    x = rand(3, 64)
    check_layer_matches(layer, x, layer.delta_weight("default").detach())


# ---- LoKr ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dimension", "factor", "expected"),
    [
        (768, -1, (24, 32)),
        (3072, -1, (48, 64)),
        (4096, -1, (64, 64)),
        (11008, -1, (86, 128)),
        (127, -1, (1, 127)),
        (20, -1, (4, 5)),
        (12, -1, (3, 4)),
        (768, 8, (8, 96)),
        (768, 5, (4, 192)),
        (20, 3, (2, 10)),
    ],
)
def test_lokr_factorization_table(dimension: int, factor: int, expected: tuple[int, int]) -> None:
    assert factorization(dimension, factor) == expected


@pytest.mark.parametrize(
    ("r", "shapes"),
    [
        (16, {"lokr_w1": (24, 24), "lokr_w2": (32, 32)}),
        (8, {"lokr_w1": (24, 24), "lokr_w2_a": (32, 8), "lokr_w2_b": (8, 32)}),
    ],
)
def test_lokr_shapes_on_768(r: int, shapes: dict[str, tuple[int, ...]]) -> None:
    layer = wrap(nn.Linear(768, 768), LoKrConfig(r=r))
    got = {
        n: tuple(getattr(layer, n)["default"].shape)
        for n in layer.adapter_param_names
        if "default" in getattr(layer, n)
    }
    assert got == shapes
    assert sum(math.prod(s) for s in shapes.values()) == (1600 if r == 16 else 576 + 512)


def test_lokr_linear_full_and_factored_w2() -> None:
    full = wrap(nn.Linear(8, 12), LoKrConfig(r=8, alpha=4, init_weights=False))  # (3,4)x(2,4), r >= 2
    w1, w2 = full.lokr_w1["default"].detach(), full.lokr_w2["default"].detach()
    assert w1.shape == (3, 2) and w2.shape == (4, 4)
    expected = kron_by_hand(w1, w2) * 0.5
    torch.testing.assert_close(full.delta_weight("default"), expected)
    check_layer_matches(full, rand(5, 8), expected)

    factored = wrap(nn.Linear(32, 64), LoKrConfig(r=2, alpha=2, init_weights=False))  # (8,8)x(4,8)
    w2a, w2b = factored.lokr_w2_a["default"].detach(), factored.lokr_w2_b["default"].detach()
    assert w2a.shape == (8, 2) and w2b.shape == (2, 8) and "default" not in factored.lokr_w2
    expected = kron_by_hand(factored.lokr_w1["default"].detach(), w2a @ w2b)
    torch.testing.assert_close(factored.delta_weight("default"), expected)
    check_layer_matches(factored, rand(3, 2, 32), expected)


def test_lokr_decompose_both_and_factor() -> None:
    # decompose_both: W1 = W1a W1b when r < max(a, c)/2; 64 → (8, 8), so r = 2 < 4.
    layer = wrap(nn.Linear(64, 64), LoKrConfig(r=2, alpha=4, decompose_both=True, init_weights=False))
    w1a, w1b = layer.lokr_w1_a["default"].detach(), layer.lokr_w1_b["default"].detach()
    assert w1a.shape == (8, 2) and w1b.shape == (2, 8) and "default" not in layer.lokr_w1
    w2 = layer.lokr_w2_a["default"].detach() @ layer.lokr_w2_b["default"].detach()
    expected = kron_by_hand(w1a @ w1b, w2) * 2.0
    torch.testing.assert_close(layer.delta_weight("default"), expected, atol=1e-6, rtol=1e-5)
    check_layer_matches(layer, rand(3, 64), expected)
    # decompose_factor picks the first factor: 64 → (4, 16), 32 → (4, 8).
    factored = wrap(nn.Linear(32, 64), LoKrConfig(r=16, decompose_factor=4))
    assert factored.lokr_w1["default"].shape == (4, 4)
    assert factored.lokr_w2["default"].shape == (16, 8)


def test_lokr_init_modes() -> None:
    default = wrap(nn.Linear(16, 16), LoKrConfig(r=8))
    assert torch.count_nonzero(default.lokr_w1["default"]) == 0
    assert torch.count_nonzero(default.lokr_w2["default"]) > 0
    lycoris = wrap(nn.Linear(16, 16), LoKrConfig(r=8, init_weights="lycoris"))
    assert torch.count_nonzero(lycoris.lokr_w2["default"]) == 0
    assert torch.count_nonzero(lycoris.lokr_w1["default"]) > 0


def test_lokr_conv_full_and_cp() -> None:
    full = wrap(nn.Conv2d(4, 6, 3, padding=1), LoKrConfig(r=8, alpha=8, init_weights=False))  # (2,3)x(2,2)
    w1, w2 = full.lokr_w1["default"].detach(), full.lokr_w2["default"].detach()
    assert w1.shape == (2, 2) and w2.shape == (3, 2, 3, 3)
    expected = kron_by_hand(w1, w2)
    torch.testing.assert_close(full.delta_weight("default"), expected)
    check_layer_matches(full, rand(2, 4, 5, 5), expected)

    config = LoKrConfig(r=1, alpha=2, use_effective_conv2d=True, init_weights=False)
    cp = wrap(nn.Conv2d(16, 32, 3, padding=1), config)  # out (4, 8), in (4, 4): r = 1 < 4
    t2, w2a, w2b = (
        cp.lokr_t2["default"].detach(),
        cp.lokr_w2_a["default"].detach(),
        cp.lokr_w2_b["default"].detach(),
    )
    assert t2.shape == (1, 1, 3, 3) and w2a.shape == (1, 8) and w2b.shape == (1, 4)
    expected = kron_by_hand(cp.lokr_w1["default"].detach(), cp_by_hand(t2, w2a, w2b)) * 2.0
    torch.testing.assert_close(cp.delta_weight("default"), expected, atol=1e-6, rtol=1e-5)
    check_layer_matches(cp, rand(2, 16, 5, 5), expected)

    plain = wrap(nn.Conv2d(16, 32, 3, padding=1), LoKrConfig(r=1, init_weights=False))
    assert plain.lokr_w2_a["default"].shape == (8, 1) and plain.lokr_w2_b["default"].shape == (1, 36)


@pytest.mark.parametrize("form", ["full", "factored", "masked"])
def test_lokr_fast_path_equals_materialised(form: str) -> None:
    w1 = rand(3, 4, seed=1).requires_grad_()
    w2_parts = [rand(5, 6, seed=2)] if form == "full" else [rand(5, 2, seed=2), rand(2, 6, seed=3)]
    leaves = [w.clone().requires_grad_() for w in w2_parts]
    refs = [w.clone().requires_grad_() for w in w2_parts]
    w1_ref = w1.detach().clone().requires_grad_()
    mask = (rand(15, seed=4) > 0).float() if form == "masked" else None
    x = rand(2, 3, 24, seed=5)
    if form == "full":
        y = lokr_delta_forward(x, w1, 0.7, w2=leaves[0], row_mask=mask)
        w2_ref = refs[0]
    else:
        y = lokr_delta_forward(x, w1, 0.7, w2a=leaves[0], w2b=leaves[1], row_mask=mask)
        w2_ref = refs[0] @ refs[1]
    delta = lokr_delta_weight(w1_ref, w2_ref, 0.7, (15, 24))
    if mask is not None:
        delta = delta * mask[:, None]
    y_ref = F.linear(x, delta)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = rand(*y.shape, seed=6)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(w1.grad, w1_ref.grad, atol=1e-4, rtol=1e-5)
    for leaf, ref in zip(leaves, refs, strict=True):
        torch.testing.assert_close(leaf.grad, ref.grad, atol=1e-4, rtol=1e-5)


# ---- AdaLoRA ------------------------------------------------------------------------------------
def test_adalora_delta_and_forward() -> None:
    layer = wrap(nn.Linear(10, 7), AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, init_lora_weights=False))
    assert isinstance(layer, SVDLayer)
    a, e, b = (layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"])
    assert a.shape == (4, 10) and e.shape == (4, 1) and b.shape == (7, 4)
    assert layer.ranknum["default"].item() == 4.0 and not layer.ranknum["default"].requires_grad
    expected = (b @ (a * e) * 8 / (4 + 1e-5)).detach()
    torch.testing.assert_close(layer.delta_weight("default"), expected)
    torch.testing.assert_close(adalora_delta_weight(a, e, b, 8, 4.0), expected)
    check_layer_matches(layer, rand(3, 10), expected)


def test_adalora_default_scale_and_init() -> None:
    layer = wrap(nn.Linear(10, 7), AdaLoraConfig(total_step=10))
    # Default lora_alpha 8, init_r 12: factor 8 / (12 + 1e-5) ≈ 0.667, never divided by the final rank.
    assert layer.scaling["default"] / (layer.ranknum["default"].item() + 1e-5) == pytest.approx(
        0.6667, abs=1e-4
    )
    assert torch.count_nonzero(layer.lora_E["default"]) == 0
    assert float(layer.lora_A["default"].detach().std()) == pytest.approx(0.02, rel=0.4)


def test_adalora_conv_delta() -> None:
    layer = wrap(nn.Conv2d(3, 4, 3, padding=1), AdaLoraConfig(init_r=2, target_r=1, init_lora_weights=False))
    a, e, b = (layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"])
    assert a.shape == (2, 27) and b.shape == (4, 2)
    expected = (b @ (a * e) * 8 / (2 + 1e-5)).detach().view(4, 3, 3, 3)
    torch.testing.assert_close(layer.delta_weight("default"), expected)
    check_layer_matches(layer, rand(2, 3, 5, 5), expected)


@pytest.mark.parametrize(
    ("step", "budget", "mask"),
    [
        (3, 12, False),
        (5, 12, False),
        (6, 10, False),
        (8, 8, False),
        (10, 7, True),
        (20, 4, True),
        (26, 4, True),
        (30, 4, True),
    ],
)
def test_adalora_budget_schedule(step: int, budget: int, mask: bool) -> None:
    # The reference example: init 12, target 4 (total budgets), tinit 5, tfinal 5, T 30, deltaT 10.
    assert budget_schedule(step, 12, 4, 5, 5, 30, 10) == (budget, mask)


def test_adalora_budget_schedule_deltat_one_masks_every_step() -> None:
    assert budget_schedule(6, 12, 4, 5, 5, 30, 1) == (10, True)


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 6)
        self.v = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(torch.tanh(self.q(x)))


def _adalora_two(**kw: Any) -> Any:
    torch.manual_seed(0)
    config = AdaLoraConfig(target_modules=["q", "v"], init_r=4, target_r=1, init_lora_weights=False, **kw)
    return get_peft_model(TwoLinear(), config)


def test_adalora_budgets_are_totals_over_modules() -> None:
    model = _adalora_two(total_step=10)
    allocator = model.base_model.rank_allocator
    assert isinstance(allocator, RankAllocator)
    assert (allocator.init_bgt, allocator.target_bgt) == (8, 2)


def test_adalora_importance_emas_and_masking() -> None:
    model = _adalora_two(total_step=10, beta1=0.5, beta2=0.25)
    allocator = model.base_model.rank_allocator
    params = allocator._params()
    history = []
    for seed in (1, 2):
        for i, p in enumerate(params):
            p.grad = rand(*p.shape, seed=10 * seed + i)
        history.append([(p.detach() * p.grad).abs() for p in params])
        assert allocator.update_ipt()
    # Ī ← β1 Ī + (1−β1) I;  Ū ← β2 Ū + (1−β2) |I − Ī| with the new Ī.
    for k in range(len(params)):
        i1, i2 = history[0][k], history[1][k]
        ipt1 = 0.5 * i1
        unc1 = 0.75 * (i1 - ipt1).abs()
        ipt2 = 0.5 * ipt1 + 0.5 * i2
        unc2 = 0.25 * unc1 + 0.75 * (i2 - ipt2).abs()
        torch.testing.assert_close(allocator.ipt[k], ipt2)
        torch.testing.assert_close(allocator.unc[k], unc2)
    # S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki) with s = Ī ⊙ Ū.
    scores = allocator.triplet_scores()
    s = [allocator.ipt[k] * allocator.unc[k] for k in range(len(params))]
    expected = [s[1].view(-1) + s[0].mean(1) + s[2].mean(0), s[4].view(-1) + s[3].mean(1) + s[5].mean(0)]
    for got, want in zip(scores, expected, strict=True):
        torch.testing.assert_close(got, want)
    # Masking to a budget of 3 of 8 zeroes the 5 lowest-scoring E_i and leaves A and B untouched.
    a_before = [p.detach().clone() for p in params]
    masks = allocator.mask_to_budget(3)
    flat = torch.cat(expected)
    keep = flat > torch.sort(flat).values[4]
    assert torch.equal(torch.cat(masks), keep) and int(keep.sum()) == 3
    for (_, layer), mask in zip(allocator.layers, masks, strict=True):
        e = layer.lora_E["default"].detach().view(-1)
        assert torch.all(e[~mask] == 0) and torch.all(e[mask] != 0)
    torch.testing.assert_close(params[0].detach(), a_before[0])
    pattern = allocator.rank_pattern()
    assert pattern is not None and set(pattern) == {"q.lora_E", "v.lora_E"}
    assert sum(map(sum, pattern.values())) == 3


def test_adalora_update_and_allocate_reaches_target_and_freezes() -> None:
    model = _adalora_two(total_step=8, tinit=1, tfinal=2, deltaT=1)
    x = rand(4, 6)
    for step in range(8):
        model.train()
        out = model(x)
        out.square().mean().backward()
        model.base_model.update_and_allocate(step)
        for p in model.parameters():
            p.grad = None
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and sum(map(sum, pattern.values())) == 2
    for name, layer in model.base_model.adapter_layers():
        keep = torch.tensor(pattern[f"{name}.lora_E"])
        assert torch.all(layer.lora_E["default"].detach().view(-1)[~keep] == 0)


def _train_two(model: Any, steps: range, lr: float = 1e-3) -> None:
    x = rand(4, 6)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in steps:
        model(x).square().mean().backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()


def test_adalora_checkpoint_resumes_into_the_training_adapter(tmp_path: Any) -> None:
    """A pruned checkpoint reloads into a full-rank adapter (as the Trainer does on resume): same
    outputs, same files on the next save, and the rank pattern is enforced after tfinal."""
    schedule = {"total_step": 8, "tinit": 1, "tfinal": 2, "deltaT": 1}
    model = _adalora_two(**schedule)
    _train_two(model, range(7))
    x = rand(3, 6)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "ckpt")
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None

    resumed = _adalora_two(**schedule)
    resumed.load_adapter(tmp_path / "ckpt", "default", is_trainable=True)
    assert all(layer.r["default"] == 4 for _, layer in resumed.base_model.adapter_layers())
    assert resumed.peft_config["default"].rank_pattern == pattern
    with torch.no_grad():
        torch.testing.assert_close(resumed(x), expected, atol=1e-6, rtol=1e-6)
    resumed.save_pretrained(tmp_path / "again")
    saved = load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)

    # After tfinal the stored pattern is enforced, also by the fresh allocator of the resumed run.
    with torch.no_grad():
        for _, layer in resumed.base_model.adapter_layers():
            layer.lora_E["default"].fill_(1.0)
    resumed.base_model.update_and_allocate(7)
    for name, layer in resumed.base_model.adapter_layers():
        keep = torch.tensor(pattern[f"{name}.lora_E"])
        e = layer.lora_E["default"].detach().view(-1)
        assert torch.all(e[~keep] == 0) and torch.all(e[keep] == 1)


def test_adalora_update_and_allocate_needs_total_step() -> None:
    model = _adalora_two()
    with pytest.raises(ValueError, match="total_step"):
        model.base_model.update_and_allocate(0)


def test_orthogonal_regulariser_by_hand() -> None:
    a1, b1 = rand(3, 5, seed=1), rand(7, 3, seed=2)
    a2, b2 = rand(2, 5, seed=3), rand(4, 2, seed=4)
    expected = (
        torch.linalg.norm(a1 @ a1.t() - torch.eye(3))
        + torch.linalg.norm(b1.t() @ b1 - torch.eye(3))
        + torch.linalg.norm(a2 @ a2.t() - torch.eye(2))
        + torch.linalg.norm(b2.t() @ b2 - torch.eye(2))
    ) / 4
    torch.testing.assert_close(orthogonal_regularizer([(a1, b1), (a2, b2)]), expected)


def test_adalora_forward_adds_orthogonal_loss_only_in_training() -> None:
    model = _adalora_two(total_step=10, orth_reg_weight=0.3)

    class Out:
        def __init__(self, loss: torch.Tensor) -> None:
            self.loss = loss

    inner = model.base_model.model
    original_forward = inner.forward
    inner.forward = lambda x: Out(original_forward(x).sum())  # type: ignore[method-assign]
    x = rand(2, 6)
    model.train()
    plain = original_forward(x).sum()
    reg = model.base_model.orthogonal_loss()
    torch.testing.assert_close(model(x).loss, plain + 0.3 * reg)
    model.eval()
    torch.testing.assert_close(model(x).loss, plain)


# ---- dtypes -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=2, init_lora_weights=False),
        LoHaConfig(r=2, init_weights=False),
        LoKrConfig(r=2, init_weights=False),
        AdaLoraConfig(init_r=2, target_r=1, init_lora_weights=False),
    ],
    ids=["lora", "loha", "lokr", "adalora"],
)
def test_half_precision_base_keeps_fp32_adapters(config: Any) -> None:
    layer = wrap(nn.Linear(16, 16).to(torch.bfloat16), config)
    assert all(p.dtype == torch.float32 for p in layer.adapter_parameters("default"))
    x = rand(3, 16).to(torch.bfloat16)
    layer.eval()
    with torch.no_grad():
        out = layer(x)
        assert out.dtype == torch.bfloat16
        delta = layer.delta_weight("default")
        expected = F.linear(x.float(), layer.base_layer.weight.float() + delta, layer.base_layer.bias.float())
        torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
        before = layer.base_layer.weight.clone()
        layer.merge()
        assert layer.base_layer.weight.dtype == torch.bfloat16
        layer.unmerge()
        # bf16 rounding of W + ΔW (ΔW of order 1 here) bounds how exactly unmerge restores W.
        scale = float(delta.abs().max()) + 1.0
        torch.testing.assert_close(layer.base_layer.weight, before, atol=0.01 * scale, rtol=0.0)


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=2, init_lora_weights=False),
        LoHaConfig(r=2, init_weights=False),
        LoHaConfig(r=2, init_weights=False, use_effective_conv2d=True),
        LoKrConfig(r=2, init_weights=False),
        AdaLoraConfig(init_r=2, target_r=1, init_lora_weights=False),
    ],
    ids=["lora", "loha", "loha-cp", "lokr", "adalora"],
)
def test_conv_padding_mode_is_honoured(config: Any) -> None:
    """The adapter term uses the base conv's padding mode, so forward equals the merged conv."""
    layer = wrap(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), config)
    layer.eval()
    x = rand(2, 4, 6, 6)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


def test_lora_fan_in_fan_out_on_linear_warns_and_is_reset() -> None:
    config = LoraConfig(r=2, target_modules=["layer"], fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        get_peft_model(Single(nn.Linear(4, 4)), config)
    assert config.fan_in_fan_out is False


def test_lora_bias_without_base_bias_refuses_to_merge() -> None:
    layer = wrap(nn.Linear(6, 4, bias=False), LoraConfig(r=2, lora_bias=True, init_lora_weights=False))
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="lora_bias"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged
