"""LoRA's initialisers from the base weight (``init_lora_weights="pissa"``, ``"pissa_niter_N"``, ``"olora"``,
``"orthogonal"``, ``"loftq"``): the same tensors as ``peft`` on the same model and seed, the model's output at
creation, the conversion back to plain LoRA on save (``path_initial_model_for_weight_conversion``) with
cross-loading both ways, LoftQ's quantizer against bitsandbytes (when installed), and every refusal.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODEL_KINDS, logits, make_convnet, make_mlp, max_abs_diff, read_adapter
from torch import nn

import deltatune
from deltatune import AdaLoraConfig, LoraConfig, get_peft_model
from deltatune.cli.flags import adapter_kwargs_for, add_adapter_flags
from deltatune.methods._lora_init import loftq_factors, quantize_dequantize
from deltatune.methods._lora_layer import LoraLayer
from deltatune.methods.lora import LoftQConfig

peft = pytest.importorskip("peft")

INITS = ["pissa", "pissa_niter_2", "olora", "orthogonal"]
#: PiSSA and OLoRA rewrite the base weight with the residual; the output at creation is the base model's.
REWRITING = ["pissa", "pissa_niter_2", "olora"]
TOL = 1e-5


def _pair(init: str, kind: str = "mlp", **kw: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, deltatune model, peft model) from the same base and seed."""
    model_kind = MODEL_KINDS[kind]
    base = model_kind.build(0)
    options: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": model_kind.targets, **kw}
    models = []
    for lib in (deltatune, peft):
        torch.manual_seed(1)
        models.append(
            lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(init_lora_weights=init, **options))
        )
    return base, models[0], models[1]


def _x(kind: str = "mlp") -> torch.Tensor:
    return MODEL_KINDS[kind].inputs(5)


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
@pytest.mark.parametrize("init", INITS)
def test_same_tensors_as_peft(init: str, kind: str) -> None:
    if init == "olora" and kind == "gpt2":
        pytest.skip(
            "peft 0.21 runs OLoRA on a Conv1D's stored (in, out) weight, which breaks its forward; ours: next test"
        )
    _, ours, theirs = _pair(init, kind)
    mine, other = ours.state_dict(), theirs.state_dict()
    assert sorted(mine) == sorted(other)
    for key, value in mine.items():  # adapters and the (rewritten) base weights
        assert max_abs_diff(value, other[key]) <= 1e-6, key
    x = _x(kind)
    assert max_abs_diff(logits(ours, x), logits(theirs, x)) <= TOL


@pytest.mark.parametrize("kind", ["mlp", "gpt2", "vit"])
@pytest.mark.parametrize("init", REWRITING)
def test_output_at_creation_is_the_base_models(init: str, kind: str) -> None:
    base, ours, _ = _pair(init, kind)
    x = _x(kind)
    assert max_abs_diff(logits(ours, x), logits(base, x)) <= TOL
    target = MODEL_KINDS[kind].targets[0]
    name = next(n for n, _ in base.named_modules() if n == target or n.endswith("." + target))
    layer = ours.base_model.model.get_submodule(name)
    assert max_abs_diff(layer.base_weight.detach(), base.get_submodule(name).weight.detach()) > 1e-3


def test_pissa_is_the_best_rank_r_approximation() -> None:
    base, ours, _ = _pair("pissa", r=4, lora_alpha=4)
    layer = ours.base_model.model.fc2
    w = base.fc2.weight.detach()
    u, s, vh = torch.linalg.svd(w)
    assert max_abs_diff(layer.delta_weight("default"), u[:, :4] @ torch.diag(s[:4]) @ vh[:4]) <= 1e-5


def test_olora_b_is_orthonormal() -> None:
    _, ours, _ = _pair("olora")
    b = ours.base_model.model.fc1.lora_B["default"].weight
    assert max_abs_diff(b.T @ b, torch.eye(4)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_agrees_with_peft(dtype: torch.dtype) -> None:
    """The residual is the same; A and B differ by one rounding to ``dtype``: peft rounds them to the base's dtype
    before its float32 autocast, deltatune keeps the float32 factors the residual was computed from (so its
    output at creation is at least as close to the base model's)."""
    base = make_mlp().to(dtype)
    models = []
    for lib in (deltatune, peft):
        config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights="pissa")
        models.append(lib.get_peft_model(copy.deepcopy(base), config))
    ours, theirs = (m.state_dict() for m in models)
    eps = torch.finfo(dtype).eps
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype, key
        assert max_abs_diff(value.float(), theirs[key].float()) <= eps * float(value.float().abs().max()), key
    x = _x().to(dtype)
    expected = logits(base, x).float()
    ours_error, peft_error = (max_abs_diff(logits(m, x).float(), expected) for m in models)
    assert ours_error <= peft_error + eps


def test_dora_with_pissa_matches_peft() -> None:
    _, ours, theirs = _pair("pissa", use_dora=True)
    x = _x()
    assert max_abs_diff(logits(ours, x), logits(theirs, x)) <= TOL


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
@pytest.mark.parametrize("init", [*INITS, "loftq"])
def test_merge_unmerge_and_merge_and_unload(init: str, kind: str) -> None:
    """The layer contract on the rewritten base: merged = unmerged output, unmerging restores the (residual)
    base weights, ``merge_and_unload`` keeps the output."""
    model = _loftq_model(kind) if init == "loftq" else _pair(init, kind)[1]
    _train_a_little(model)
    x = _x(kind)
    expected = logits(model, x)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    before = [layer.base_weight.detach().clone() for layer in layers]
    model.merge_adapter()
    assert max_abs_diff(logits(model, x), expected) <= TOL
    model.unmerge_adapter()
    assert all(
        max_abs_diff(layer.base_weight.detach(), w) <= 1e-6 for layer, w in zip(layers, before, strict=True)
    )
    assert max_abs_diff(logits(model.merge_and_unload(), x), expected) <= TOL


def _loftq_model(kind: str) -> nn.Module:
    model_kind = MODEL_KINDS[kind]
    config = LoraConfig(
        r=4, target_modules=model_kind.targets, init_lora_weights="loftq", loftq_config={"loftq_bits": 4}
    )
    return get_peft_model(model_kind.build(0), config)


def _train_a_little(model: nn.Module) -> None:
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("saver", ["deltatune", "peft"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_to_plain_lora_cross_loads(init: str, saver: str, tmp_path: Path) -> None:
    base = make_mlp()
    lib = deltatune if saver == "deltatune" else peft
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=init)
    model = lib.get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path / "init")
    _train_a_little(model)
    x = _x()
    trained = logits(model, x)
    model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    saved, tensors = read_adapter(tmp_path / "out")
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    assert json.loads((tmp_path / "init" / "adapter_config.json").read_text())["init_lora_weights"] is True
    assert tensors["base_model.model.fc1.lora_A.weight"].shape == (8, 16)
    for loader in (deltatune, peft):  # the converted adapter works on the original base
        loaded = loader.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
        assert max_abs_diff(logits(loaded, x), trained) <= TOL, loader.__name__


def test_converted_config_keeps_the_scaling_with_rslora_and_patterns(tmp_path: Path) -> None:
    base = make_mlp()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights="pissa", rank_pattern={"fc2": 2}
    )
    model = get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path / "init")
    model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    saved, _ = read_adapter(tmp_path / "out")
    assert saved["rank_pattern"] == {"fc2": 4}
    rs = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], init_lora_weights="olora", use_rslora=True)
    model = get_peft_model(copy.deepcopy(base), rs)
    model.save_pretrained(tmp_path / "init2")
    model.save_pretrained(tmp_path / "out2", path_initial_model_for_weight_conversion=str(tmp_path / "init2"))
    assert read_adapter(tmp_path / "out2")[0]["lora_alpha"] == pytest.approx(8 * 2**0.5)


def test_conversion_refusals(tmp_path: Path) -> None:
    base = make_mlp()
    config = LoraConfig(
        r=4, target_modules=["fc1"], init_lora_weights="pissa", use_rslora=True, alpha_pattern={"fc1": 3}
    )
    model = get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="not supported when using `rank_pattern` or `alpha_pattern`"):
        model.save_pretrained(
            tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init")
        )
    plain = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, target_modules=["fc1"], init_lora_weights="gaussian")
    )
    plain.save_pretrained(tmp_path / "g")
    with pytest.warns(UserWarning, match="only works for converting a PiSSA/CorDA/OLoRA"):
        plain.save_pretrained(tmp_path / "g2", path_initial_model_for_weight_conversion=str(tmp_path / "g"))
    ia3 = get_peft_model(
        copy.deepcopy(base), deltatune.IA3Config(target_modules=["fc1"], feedforward_modules=[])
    )
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="not supported for IA3 adapters"):
        ia3.save_pretrained(tmp_path / "ia3b", path_initial_model_for_weight_conversion=str(tmp_path / "ia3"))


def test_second_adapter_next_to_pissa_warns() -> None:
    model = get_peft_model(make_mlp(), LoraConfig(r=2, target_modules=["fc1"], init_lora_weights="pissa"))
    with pytest.warns(UserWarning, match="PiSSA changes the base weights"):
        model.add_adapter("other", LoraConfig(r=2, target_modules=["fc1"]))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_unconverted_adapter_loads_in_peft(init: str, tmp_path: Path) -> None:
    """Loading re-runs the (deterministic) decomposition on the original base, as in PEFT."""
    base = make_mlp()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=init)
    model = get_peft_model(copy.deepcopy(base), config)
    _train_a_little(model)
    model.save_pretrained(tmp_path)
    x = _x()
    for loader in (deltatune, peft):
        loaded = loader.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert max_abs_diff(logits(loaded, x), logits(model, x)) <= TOL, loader.__name__


# ---- LoftQ ----------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("shape", [(48, 64), (33, 17), (7, 5)])
def test_quantizer_matches_bitsandbytes(shape: tuple[int, int]) -> None:
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(*shape)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(quantize_dequantize(w, 4), bnb_functional.dequantize_4bit(packed, state))
    codes, stats, _ = bnb_functional.int8_vectorwise_quant(w)
    assert (
        max_abs_diff(quantize_dequantize(w, 8), bnb_functional.int8_vectorwise_dequant(codes, stats)) <= 1e-6
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_base_is_quantized_and_the_adapter_recovers_the_error(bits: int) -> None:
    base = make_mlp()
    config = LoraConfig(
        r=8,
        lora_alpha=8,
        target_modules=["fc2"],
        init_lora_weights="loftq",
        loftq_config={"loftq_bits": bits},
    )
    layer = get_peft_model(copy.deepcopy(base), config).base_model.model.fc2
    w = base.fc2.weight.detach()
    assert torch.equal(layer.base_weight, quantize_dequantize(w, bits))
    recovered = layer.base_weight + layer.delta_weight("default")
    assert torch.linalg.norm(recovered - w) < torch.linalg.norm(layer.base_weight - w)


def test_loftq_iterations_reduce_the_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    errors = []
    for iterations in (1, 4):
        a, b, q = loftq_factors(w, 8, 4, iterations)
        errors.append(torch.linalg.norm(q + b @ a - w).item())
    assert errors[1] < errors[0]


def test_loftq_config_object_becomes_a_dict_and_round_trips(tmp_path: Path) -> None:
    assert deltatune.LoftQConfig is LoftQConfig  # exported at the top, as in PEFT
    config = LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=8, loftq_iter=2))
    assert config.loftq_config == {"loftq_bits": 8, "loftq_iter": 2}
    config.save_pretrained(tmp_path)
    assert peft.PeftConfig.from_pretrained(tmp_path).loftq_config == {"loftq_bits": 8, "loftq_iter": 2}
    with pytest.warns(UserWarning, match="`loftq_config` specified but will be ignored"):
        assert LoraConfig(loftq_config={"loftq_bits": 4}).loftq_config == {}


# ---- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda: LoraConfig(init_lora_weights="pissa_niter_x"), ["pissa_niter_x", "'pissa_niter_N'"]),
        (lambda: LoraConfig(init_lora_weights="pissa_niter_-1"), ["pissa_niter_-1", "non-negative"]),
        (
            lambda: LoraConfig(init_lora_weights="lora_ga"),
            ["init_lora_weights='lora_ga'", "'olora'", "'corda'"],
        ),
        (lambda: LoraConfig(init_lora_weights="olora", lora_bias=True), ["lora_bias=True", "olora"]),
        (lambda: LoraConfig(init_lora_weights="loftq"), ["`loftq_config` must be specified"]),
        (
            lambda: LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3}),
            ["loftq_bits=3", "4 or 8"],
        ),
        (lambda: LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 0}), ["loftq_iter=0"]),
        (lambda: AdaLoraConfig(total_step=10, init_lora_weights="pissa"), ["init_lora_weights='pissa'"]),
    ],
)
def test_config_refusals(make: Any, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        make()
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("model", "config", "error", "fragment"),
    [
        (
            make_mlp,
            LoraConfig(r=3, target_modules=["fc1"], init_lora_weights="orthogonal"),
            ValueError,
            "even, got 3",
        ),
        (
            make_mlp,
            LoraConfig(r=20, target_modules=["fc1"], init_lora_weights="pissa"),
            ValueError,
            "r <= min(out, in) = 16",
        ),
        (
            make_convnet,
            LoraConfig(r=2, target_modules=["conv2"], init_lora_weights="olora"),
            ValueError,
            "supports Linear and Conv1D layers, not Conv2d",
        ),
    ],
)
def test_layer_refusals(model: Any, config: LoraConfig, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        get_peft_model(model(), config)
    assert fragment in str(info.value)


def test_loftq_on_an_embedding_is_refused() -> None:
    kind = MODEL_KINDS["embedding"]
    config = LoraConfig(
        r=2, target_modules=kind.targets, init_lora_weights="loftq", loftq_config={"loftq_bits": 4}
    )
    with pytest.raises(ValueError, match="'loftq' supports Linear and Conv1D layers, not Embedding"):
        get_peft_model(kind.build(0), config)


def test_multihead_attention_is_refused() -> None:
    kind = MODEL_KINDS["mha"]
    with pytest.raises(ValueError, match="'olora' supports Linear and Conv1D layers, not MultiheadAttention"):
        get_peft_model(kind.build(0), LoraConfig(r=2, target_modules=kind.targets, init_lora_weights="olora"))


def test_low_cpu_mem_usage_load_matches(tmp_path: Path) -> None:
    base = make_mlp()
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules=["fc1"], init_lora_weights="pissa")
    )
    _train_a_little(model)
    model.save_pretrained(tmp_path)
    loaded = deltatune.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert max_abs_diff(logits(loaded, _x()), logits(model, _x())) <= TOL


def test_embeddings_keep_the_default_init_as_in_peft() -> None:
    kind = MODEL_KINDS["embedding"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = get_peft_model(
            kind.build(0), LoraConfig(r=2, target_modules=kind.targets, init_lora_weights="pissa")
        )
    x = kind.inputs()
    assert max_abs_diff(logits(model, x), logits(kind.build(0), x)) == 0


def test_command_line_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_adapter_flags(parser)
    args = ["--init_lora_weights", "loftq", "--loftq_config", '{"loftq_bits": 8, "loftq_iter": 2}']
    kwargs = adapter_kwargs_for("lora", parser.parse_args(args))
    config = LoraConfig(**kwargs)
    assert (config.init_lora_weights, config.loftq_config) == ("loftq", {"loftq_bits": 8, "loftq_iter": 2})
    kwargs = adapter_kwargs_for("lora", parser.parse_args(["--init_lora_weights", "pissa_niter_4"]))
    assert LoraConfig(**kwargs).init_lora_weights == "pissa_niter_4"
