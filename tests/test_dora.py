"""DoRA (``LoraConfig(use_dora=True)``): its maths against hand-written formulas and against ``peft``, the
fused path against the generic one, trained adapters both ways through files, and the command line.

The contract suite (test_contract.py) and the interop matrix (test_interop_peft.py) cover DoRA through the
registry; this file checks what is DoRA's own.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_KINDS, logits, make_config, make_peft_config, max_abs_diff, read_adapter
from tiny import save_tiny_vit_dir

import deltatune
from deltatune import LoraConfig, get_peft_model
from deltatune.methods.dora import DoraLayer, dora_forward, dora_merged_weight, dora_row_norm

TOL = 1e-5


def _direct_norm(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return (w + s * b @ a).norm(dim=1)


def test_row_norm_identity_matches_the_materialised_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    w, a, b = (
        torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((48, 40), (5, 40), (48, 5))
    )
    torch.testing.assert_close(dora_row_norm(w, a, b, 1.7), _direct_norm(w, a, b, 1.7))
    zero_b = torch.zeros_like(b)
    torch.testing.assert_close(dora_row_norm(w, a, zero_b, 1.7), w.norm(dim=1))


def test_forward_formula_and_detached_norm_gradients() -> None:
    """y = m/‖W+sBA‖ (xW + s xAB) + b, and gradients flow as if the norm were a constant (DoRA §4.3)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 16, generator=gen)
    w, bias = torch.randn(12, 16, generator=gen), torch.randn(12, generator=gen)
    a = torch.randn(3, 16, generator=gen).requires_grad_()
    b = torch.randn(12, 3, generator=gen).requires_grad_()
    m = (torch.rand(12, generator=gen) + 0.5).requires_grad_()
    s = 0.7
    y = dora_forward(x, w, bias, a, b, m, s)
    a2, b2, m2 = (t.detach().clone().requires_grad_() for t in (a, b, m))
    norm = _direct_norm(w, a2, b2, s).detach()
    expected = (m2 / norm) * (x @ w.t() + s * (x @ a2.t()) @ b2.t()) + bias
    torch.testing.assert_close(y, expected)
    y.square().sum().backward()
    expected.square().sum().backward()
    for ours, theirs in ((a, a2), (b, b2), (m, m2)):
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_merged_weight_formula() -> None:
    gen = torch.Generator().manual_seed(2)
    w, delta = torch.randn(8, 5, 3, 3, generator=gen), torch.randn(8, 5, 3, 3, generator=gen)
    magnitude = torch.rand(1, 8, 1, 1, generator=gen) + 0.1
    merged, norm = dora_merged_weight(w, delta, magnitude)
    rows = (w + delta).reshape(8, -1)
    torch.testing.assert_close(norm, rows.norm(dim=1))
    torch.testing.assert_close(
        merged.reshape(8, -1), magnitude.reshape(8, 1) * rows / rows.norm(dim=1, keepdim=True)
    )


def _pair(kind_name: str, **extra: Any) -> tuple[Any, Any]:
    """(peft model, deltatune model) holding the same DoRA adapter (peft's, copied through its files)."""
    kind = MODEL_KINDS[kind_name]
    torch.manual_seed(7)
    theirs = pytest.importorskip("peft").get_peft_model(
        kind.build(0), make_peft_config("dora", kind.targets, kind.modules_to_save, **extra)
    )
    ours = get_peft_model(kind.build(0), make_config("dora", kind.targets, kind.modules_to_save, **extra))
    state = {k: v for k, v in theirs.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    mine = ours.state_dict()
    with torch.no_grad():
        for key, value in state.items():  # the same state_dict keys, DoRA's magnitudes included
            mine[key].copy_(value)
    return theirs, ours


@pytest.mark.parametrize("kind_name", ["vit", "conv", "mlp"])
def test_layer_shapes_and_saved_keys_are_peft_s(kind_name: str, tmp_path: Path) -> None:
    theirs, ours = _pair(kind_name)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    peft_config, peft_tensors = read_adapter(tmp_path / "peft")
    our_config, our_tensors = read_adapter(tmp_path / "ours")
    assert our_tensors.keys() == peft_tensors.keys()
    assert any(k.endswith("lora_magnitude_vector") for k in our_tensors)
    for key, tensor in peft_tensors.items():
        assert our_tensors[key].shape == tensor.shape, key
    assert our_config["use_dora"] is True and set(our_config) == set(peft_config)
    layers = [m for m in ours.modules() if isinstance(m, DoraLayer)]
    assert layers and all("default" in layer.lora_magnitude_vector for layer in layers)


@pytest.mark.parametrize("kind_name", ["vit", "conv"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout"])
def test_forward_matches_peft(kind_name: str, train: bool) -> None:
    """Same tensors → same outputs; in training with input dropout, PEFT's two-GEMM formula, same mask."""
    extra = {"lora_dropout": 0.3} if train else {}
    theirs, ours = _pair(kind_name, **extra)
    x = MODEL_KINDS[kind_name].inputs()
    theirs.train(train)
    ours.train(train)
    torch.manual_seed(11)
    expected = theirs(x)
    torch.manual_seed(11)
    got = ours(x)
    expected = getattr(expected, "logits", expected)
    got = getattr(got, "logits", got)
    assert max_abs_diff(got, expected) < TOL


def _sgd_steps(model: Any, x: torch.Tensor, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(steps):
        out = model(x)
        out = getattr(out, "logits", out)
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("kind_name", ["vit", "conv"])
def test_trained_adapters_cross_load_both_ways(kind_name: str, tmp_path: Path) -> None:
    """After training (magnitudes moved away from the norms), files load in the other library with
    max abs logit difference < 1e-5, in both directions."""
    peft = pytest.importorskip("peft")
    kind = MODEL_KINDS[kind_name]
    x = kind.inputs()
    theirs, ours = _pair(kind_name)
    _sgd_steps(theirs, x)
    _sgd_steps(ours, x)
    moved = [m for m in ours.modules() if isinstance(m, DoraLayer)]
    assert any(
        not torch.allclose(layer.lora_magnitude_vector["default"].reshape(-1), layer.row_norm("default"))
        for layer in moved
    ), "training must move the magnitudes off the norms"
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    into_ours = deltatune.PeftModel.from_pretrained(kind.build(0), tmp_path / "peft")
    into_peft = peft.PeftModel.from_pretrained(kind.build(0), str(tmp_path / "ours")).eval()
    assert max_abs_diff(logits(into_ours, x), logits(theirs, x)) < TOL
    assert max_abs_diff(logits(into_peft, x), logits(ours, x)) < TOL


def test_fused_path_equals_generic_path_forward_and_backward() -> None:
    kind = MODEL_KINDS["vit"]
    x = kind.inputs()
    models = [
        get_peft_model(kind.build(0), make_config("dora", kind.targets, kind.modules_to_save))
        for _ in range(2)
    ]
    layers = [[m for m in model.modules() if isinstance(m, DoraLayer)] for model in models]
    for layer in layers[1]:
        layer.fused_forward = lambda *a, **k: None  # type: ignore[method-assign]  # force the generic path
    grads = []
    for model in models:
        model.train()
        out = model(x).logits
        out.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("magnitude" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_merge_is_the_decomposed_weight_and_unmerge_restores() -> None:
    kind = MODEL_KINDS["mlp"]
    model = get_peft_model(kind.build(0), make_config("dora", kind.targets, kind.modules_to_save))
    x = kind.inputs()
    layer = model.base_model.model.fc1
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1.3)
    before = logits(model, x)
    original = layer.base_layer.weight.detach().clone()
    a, b = layer.factor_weights("default")
    delta = layer.scaling["default"] * b @ a
    model.merge_adapter()
    expected = 1.3 * (original + delta)  # m was ‖W + ΔW‖ by row, now 1.3 times it: W' = 1.3 · (W + ΔW)
    torch.testing.assert_close(layer.base_layer.weight.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert max_abs_diff(logits(model, x), before) < TOL
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight.detach(), original, rtol=1e-5, atol=1e-6)
    merged = model.merge_and_unload()
    assert isinstance(merged.fc1, torch.nn.Linear)
    assert max_abs_diff(merged(x), before) < TOL


def test_selected_by_use_dora_and_by_name() -> None:
    config = LoraConfig(r=4, target_modules=["fc1"], use_dora=True)
    assert deltatune.spec_for(config).name == "dora"
    assert deltatune.spec_for(LoraConfig(r=4, target_modules=["fc1"])).name == "lora"
    by_name = deltatune.get_method("dora").make_config(target_modules=["fc1"])
    assert isinstance(by_name, LoraConfig) and by_name.use_dora is True
    model = get_peft_model(MODEL_KINDS["mlp"].build(0), config)
    assert isinstance(model.base_model.model.fc1, DoraLayer)
    assert json.loads(model._config_to_save("default").to_json_string())["peft_type"] == "LORA"


def test_lora_bias_is_refused_as_peft_does() -> None:
    with pytest.raises(ValueError, match="lora_bias=True is not supported with DoRA"):
        get_peft_model(
            MODEL_KINDS["mlp"].build(0), LoraConfig(target_modules=["fc1"], use_dora=True, lora_bias=True)
        )


def test_bf16_autocast_training_step_runs_and_learns_the_magnitude() -> None:
    kind = MODEL_KINDS["vit"]
    model = get_peft_model(kind.build(0), make_config("dora", kind.targets, kind.modules_to_save))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(kind.inputs()).logits
    out.float().square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_cli_trains_dora_by_name_and_by_flag(tmp_path: Path) -> None:
    from tiny import write_image_folder

    from deltatune.cli import main

    model_dir = save_tiny_vit_dir(tmp_path / "vit")
    data = write_image_folder(tmp_path / "data", per_class=6)
    common = ["--model", model_dir, "--dataset", data, "--num_train_epochs", "1", "--use_cpu"]
    common += [
        "--per_device_train_batch_size",
        "8",
        "--gradient_accumulation_steps",
        "1",
        "--disable_tqdm",
        "true",
    ]
    assert main(["train", "--method", "dora", "--output_dir", str(tmp_path / "a"), *common]) == 0
    assert (
        main(["train", "--method", "lora", "--use_dora", "--output_dir", str(tmp_path / "b"), *common]) == 0
    )
    for out in ("a", "b"):
        config, tensors = read_adapter(tmp_path / out)
        assert config["use_dora"] is True and config["peft_type"] == "LORA"
        assert any(k.endswith("lora_magnitude_vector") for k in tensors)


def test_compare_includes_dora_by_default() -> None:
    from deltatune.cli.run_args import parse_run, run_spec
    from deltatune.tasks.compare import plan_runs

    parsed = parse_run("compare", [])
    runs = plan_runs(lambda m, **kw: run_spec(parsed, m, strict=False, **kw), parsed.options.methods, [])
    assert "dora" in [r.method for r in runs]


def test_fused_and_reference_agree_on_a_plain_linear() -> None:
    """The layer's fast path equals :func:`dora_forward` on the same tensors."""
    linear = torch.nn.Linear(16, 12)
    model = get_peft_model(
        torch.nn.Sequential(linear),
        LoraConfig(r=3, target_modules=["0"], use_dora=True, init_lora_weights=False),
    )
    layer = model.base_model.model[0]
    x = torch.randn(5, 16)
    a, b = layer.factor_weights("default")
    expected = dora_forward(
        x,
        layer.base_layer.weight,
        layer.base_layer.bias,
        a,
        b,
        layer.lora_magnitude_vector["default"],
        layer.scaling["default"],
    )
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(F.linear(x, layer.base_layer.weight, layer.base_layer.bias), linear(x))


def test_dropout_node_is_peft_s_formula_forward_and_backward() -> None:
    """The training path with input dropout (one autograd node) against PEFT's formula written out, the norm
    detached: x Wᵀ + b + (m/n − 1) ⊙ d Wᵀ + (m/n) ⊙ s · d Aᵀ Bᵀ, d = factor · dropped; and gradcheck."""
    from deltatune.methods._dora_fused import _DoraDropoutLinear

    gen = torch.Generator().manual_seed(3)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, dropped, bias, a, b, m = leaf(7, 6), leaf(7, 6), leaf(5), leaf(3, 6), leaf(5, 3), leaf(5)
    w = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    norm = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    s, factor = 0.7, 1.25
    y = _DoraDropoutLinear.apply(x, dropped, None, w, bias, a, b, m, norm, s, factor)
    d, scale = dropped * factor, m / norm
    expected = F.linear(x, w, bias) + (scale - 1) * F.linear(d, w) + scale * s * F.linear(F.linear(d, a), b)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    inputs = [x, dropped, bias, a, b, m]
    for got, want in zip(
        torch.autograd.grad(y, inputs, g), torch.autograd.grad(expected, inputs, g), strict=True
    ):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(
        lambda *t: _DoraDropoutLinear.apply(t[0], t[1], None, w, *t[2:], norm, s, factor), tuple(inputs)
    )


def test_dropout_node_with_the_cpu_keep_mask_applies_it_and_routes_x_s_whole_gradient() -> None:
    """Given the 0/1 keep-mask instead of the dropped input, the node drops x itself, and x's gradient is both
    terms (the base's and the mask-gated adapter's, summed inside the node): PEFT's formula written out with
    d = factor · x ⊙ keep; a second backward through the same graph (``retain_graph``, after the first consumed
    the kept d Wᵀ in place) gives the same gradients; and gradcheck."""
    from deltatune.methods._dora_fused import _DoraDropoutLinear

    gen = torch.Generator().manual_seed(4)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, bias, a, b, m = leaf(7, 6), leaf(5), leaf(3, 6), leaf(5, 3), leaf(5)
    keep = (torch.rand(7, 6, generator=gen) > 0.3).to(torch.float64)  # the CPU mask is in x's dtype
    assert 0 < int(keep.sum()) < keep.numel()
    w = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    norm = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    s, factor = 0.7, 1 / 0.7
    y = _DoraDropoutLinear.apply(x, None, keep, w, bias, a, b, m, norm, s, factor)
    d, scale = x * keep * factor, m / norm
    expected = F.linear(x, w, bias) + (scale - 1) * F.linear(d, w) + scale * s * F.linear(F.linear(d, a), b)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    inputs = [x, bias, a, b, m]
    first = torch.autograd.grad(y, inputs, g, retain_graph=True)
    for got, want in zip(first, torch.autograd.grad(expected, inputs, g), strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(torch.autograd.grad(y, inputs, g), first, strict=True):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(
        lambda *t: _DoraDropoutLinear.apply(t[0], None, keep, w, *t[1:], norm, s, factor), tuple(inputs)
    )


def test_dora_dropout_linear_on_a_cpu_mask_sized_input_is_peft_s_formula() -> None:
    """Over CPU_MASK_MIN_NUMEL entries (the integer keep-mask, applied inside the node): output and every
    gradient (x's included) equal PEFT's formula with the mask the fast path draws from the same RNG state."""
    from deltatune.methods._dora_fused import dora_dropout_linear
    from deltatune.methods._fused import CPU_MASK_MIN_NUMEL, dropout_keep_mask

    gen = torch.Generator().manual_seed(5)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x = leaf(2, CPU_MASK_MIN_NUMEL // 24 + 1, 12)
    bias, a, b, m = leaf(10), leaf(3, 12), leaf(10, 3), leaf(10)
    w = torch.randn(10, 12, generator=gen, dtype=torch.float64)
    norm = torch.rand(10, generator=gen, dtype=torch.float64) + 0.5
    s, p = 0.7, 0.25
    torch.manual_seed(7)
    y = dora_dropout_linear(x, w, bias, a, b, m, norm, s, p, torch.float64)
    assert "DoraDropoutLinear" in type(y.grad_fn.next_functions[0][0]).__name__
    torch.manual_seed(7)
    d = x * dropout_keep_mask(x.shape, p, "cpu") / (1 - p)
    scale = m / norm
    expected = F.linear(x, w, bias) + (scale - 1) * F.linear(d, w) + scale * s * F.linear(F.linear(d, a), b)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    inputs = [x, bias, a, b, m]
    for got, want in zip(
        torch.autograd.grad(y, inputs, g), torch.autograd.grad(expected, inputs, g), strict=True
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bias", ["none", "all"])
def test_dropout_node_equals_the_generic_path_with_the_same_mask(bias: str) -> None:
    """With dropout in training, the fused node and the generic (PEFT-shaped) path give the same output and
    gradients for every trainable tensor and the input (small inputs: both draw F.dropout's mask)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))
    config = LoraConfig(
        r=3, lora_dropout=0.3, target_modules=["0", "2"], use_dora=True, init_lora_weights=False, bias=bias
    )
    models = [get_peft_model(copy.deepcopy(base), config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for layer in (m for m in models[1].modules() if isinstance(m, DoraLayer)):
        layer.fused_forward = lambda *a, **k: None  # type: ignore[method-assign]  # force the generic path
    x = torch.randn(2, 9, 16)
    results = []
    for model in models:
        model.train()
        torch.manual_seed(5)
        inputs = x.clone().requires_grad_()
        out = model(inputs)
        out.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads | {"input": inputs.grad}))
    fused_node = results[0][0].grad_fn.next_functions[0][0]  # under the output's view
    assert "DoraDropoutLinear" in type(fused_node).__name__
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and any("magnitude" in n for n in results[0][1])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)
