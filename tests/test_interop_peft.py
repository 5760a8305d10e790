"""Interop with ``peft`` (the test oracle), both directions, every method on every layer type.

An adapter saved by peft loads into deltatune with identical logits, and one saved by deltatune loads
into peft likewise (max abs diff < 1e-5); for the same config both libraries write the same tensor
names and shapes and the same ``adapter_config.json`` keys. Covered: the tiny ViT with
``modules_to_save=["classifier"]`` and non-zero deltas for all four methods (plus LoRA with rsLoRA and
rank/alpha patterns and LoKr with ``decompose_both``), an AdaLoRA adapter pruned by training (some
modules at rank 0), and a conv net for LoRA, LoHa and LoKr (including the effective-conv2d forms).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    MODEL_KINDS,
    logits,
    make_config,
    make_peft_config,
    max_abs_diff,
    perturb_modules_to_save,
    read_adapter,
    supports,
)

import deltatune

peft = pytest.importorskip("peft")

TOL = 1e-5


#: (method, model kind) pairs whose adapters are deliberately not PEFT-compatible, and why.
NOT_PEFT_COMPATIBLE = {
    (
        "dora",
        "grouped",
    ): "DoRA's row norms on a grouped conv use the real (ungrouped) LoRA kernel; peft's do not",
    (
        "adalora",
        "grouped",
    ): "peft sizes an AdaLoRA conv's A by all input channels, which a grouped conv cannot take",
    ("lora", "mha"): "peft 0.21 adds out_proj's ΔW twice (see test_mha_same_files_peft_doubles_out_proj)",
}

# (id, method, extra kwargs for both libraries, model kind): every registered method on every layer type it
# supports (the model kinds of conftest.py), then options worth checking one by one.
BASE_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    (f"{method}{'' if kind == 'vit' else '-' + kind}", method, {}, kind)
    for method in deltatune.available_methods()
    for kind in MODEL_KINDS
    if kind != "mlp" and supports(method, kind) and (method, kind) not in NOT_PEFT_COMPATIBLE
]
OPTION_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "lora-rslora-patterns",
        "lora",
        {
            "use_rslora": True,
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {"layers.1.attention.q_proj": 3},
        },
        "vit",
    ),
    ("lora-bias-lora_only", "lora", {"bias": "lora_only", "lora_dropout": 0.1}, "vit"),
    ("lora-bias-all", "lora", {"bias": "all"}, "mlp"),
    ("lokr-decompose-both", "lokr", {"r": 1, "decompose_both": True, "rank_dropout_scale": True}, "vit"),
    ("loha-conv-effective", "loha", {"use_effective_conv2d": True}, "conv"),
    ("lokr-conv-effective", "lokr", {"use_effective_conv2d": True, "r": 1}, "conv"),
    ("loha-conv1d-effective", "loha", {"use_effective_conv2d": True}, "conv1d"),
    ("lokr-conv1d-effective", "lokr", {"use_effective_conv2d": True, "r": 1}, "conv1d"),
    ("lokr-conv1d-full-w2", "lokr", {"r": 8}, "conv1d"),
    ("lora-embedding-rslora", "lora", {"use_rslora": True}, "embedding"),
]
CASES = BASE_CASES + OPTION_CASES
IDS = [c[0] for c in CASES]


def _peft_model(method: str, kind_name: str, extra: dict[str, Any]) -> Any:
    kind = MODEL_KINDS[kind_name]
    torch.manual_seed(7)
    model = peft.get_peft_model(
        kind.build(0), make_peft_config(method, kind.targets, kind.modules_to_save, **extra)
    )
    perturb_modules_to_save(model)
    return model.eval()


def _our_model(method: str, kind_name: str, extra: dict[str, Any], targets: list[str] | None = None) -> Any:
    kind = MODEL_KINDS[kind_name]
    torch.manual_seed(7)
    config = make_config(method, targets or kind.targets, kind.modules_to_save, **extra)
    model = deltatune.get_peft_model(kind.build(0), config)
    perturb_modules_to_save(model)
    return model.eval()


def _record(case: str, diff: float) -> None:
    """Prints the measured error (shown with ``pytest -s``; issue 2 asks for the numbers)."""
    print(f"interop {case}: max abs diff {diff:.3e}")


@pytest.mark.parametrize(("case", "method", "extra", "kind_name"), CASES, ids=IDS)
def test_peft_adapter_loads_into_deltatune(
    case: str,
    method: str,
    extra: dict[str, Any],
    kind_name: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kind = MODEL_KINDS[kind_name]
    x = kind.inputs()
    reference = _peft_model(method, kind_name, extra)
    expected = logits(reference, x)
    reference.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        ours = deltatune.PeftModel.from_pretrained(kind.build(0), tmp_path)
    assert not [r for r in caplog.records if "unknown" in r.getMessage()], (
        "peft's config keys should all be known"
    )
    with torch.no_grad():
        base = logits(kind.build(0), x)
    assert max_abs_diff(expected, base) > 1e-3, "the adapter must change the output"
    diff = max_abs_diff(logits(ours, x), expected)
    _record(f"{case} peft->deltatune", diff)
    assert diff < TOL


@pytest.mark.parametrize(("case", "method", "extra", "kind_name"), CASES, ids=IDS)
def test_deltatune_adapter_loads_into_peft(
    case: str, method: str, extra: dict[str, Any], kind_name: str, tmp_path: Path
) -> None:
    kind = MODEL_KINDS[kind_name]
    x = kind.inputs()
    ours = _our_model(method, kind_name, extra)
    expected = logits(ours, x)
    ours.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(kind.build(0), str(tmp_path)).eval()
    diff = max_abs_diff(logits(loaded, x), expected)
    _record(f"{case} deltatune->peft", diff)
    assert diff < TOL


@pytest.mark.parametrize(("case", "method", "extra", "kind_name"), CASES, ids=IDS)
def test_same_files_as_peft(
    case: str, method: str, extra: dict[str, Any], kind_name: str, tmp_path: Path
) -> None:
    _peft_model(method, kind_name, extra).save_pretrained(tmp_path / "peft")
    _our_model(method, kind_name, extra).save_pretrained(tmp_path / "ours")
    peft_config, peft_tensors = read_adapter(tmp_path / "peft")
    our_config, our_tensors = read_adapter(tmp_path / "ours")
    assert set(our_config) == set(peft_config)
    assert {k: tuple(v.shape) for k, v in our_tensors.items()} == {
        k: tuple(v.shape) for k, v in peft_tensors.items()
    }
    shared_keys = ("peft_type", "r", "target_modules", "modules_to_save", "inference_mode", "rank_pattern")
    for key in (k for k in shared_keys if k in peft_config):  # a method without ranks has no r/rank_pattern
        value = our_config[key]
        assert (sorted(value) if isinstance(value, list) else value) == (
            sorted(peft_config[key]) if isinstance(peft_config[key], list) else peft_config[key]
        ), key


@pytest.mark.parametrize("method", deltatune.available_methods())
def test_legacy_target_names_save_as_peft_does(method: str, tmp_path: Path) -> None:
    """``target_modules=["query", "value"]`` on a transformers 5 ViT saves the same files as peft with
    ``["q_proj", "v_proj"]``, and peft loads them."""
    kind = MODEL_KINDS["vit"]
    x = kind.inputs()
    ours = _our_model(method, "vit", {}, targets=["query", "value"])
    ours.save_pretrained(tmp_path / "ours")
    _peft_model(method, "vit", {}).save_pretrained(tmp_path / "peft")
    our_config, our_tensors = read_adapter(tmp_path / "ours")
    _, peft_tensors = read_adapter(tmp_path / "peft")
    assert sorted(our_config["target_modules"]) == ["q_proj", "v_proj"]
    assert our_tensors.keys() == peft_tensors.keys()
    loaded = peft.PeftModel.from_pretrained(kind.build(0), str(tmp_path / "ours")).eval()
    assert max_abs_diff(logits(loaded, x), logits(ours, x)) < TOL


def test_mha_same_files_peft_doubles_out_proj(tmp_path: Path) -> None:
    """LoRA on ``nn.MultiheadAttention``: both libraries write the same keys and shapes and load each other's
    files, but peft 0.21 adds the out_proj's ΔW twice in forward and merge (its MultiheadAttention merges it by
    hand and then through the nested layer's own merge). deltatune computes the attention with W + ΔW for
    both projections: its output equals the base module run with those weights, and peft's equals it with
    2·ΔW on out_proj. If peft fixes this, the second assertion fails and the pair can join the matrix."""
    kind = MODEL_KINDS["mha"]
    x = kind.inputs()
    reference = _peft_model("lora", "mha", {})
    reference.save_pretrained(tmp_path)
    ours = deltatune.PeftModel.from_pretrained(kind.build(0), tmp_path)
    attn = ours.base_model.model.attn
    expected = {1: kind.build(0), 2: kind.build(0)}
    with torch.no_grad():
        for factor, model in expected.items():
            model.attn.in_proj_weight += attn.delta_weight("default")
            model.attn.out_proj.weight += factor * attn.base_layer.out_proj.delta_weight("default")
            perturbed = dict(reference.named_parameters())[
                "base_model.model.head.modules_to_save.default.weight"
            ]
            model.head.weight.copy_(perturbed)
            model.head.bias.copy_(
                dict(reference.named_parameters())["base_model.model.head.modules_to_save.default.bias"]
            )
    assert max_abs_diff(logits(ours, x), logits(expected[1], x)) < TOL
    assert max_abs_diff(logits(reference, x), logits(expected[2], x)) < TOL
    assert max_abs_diff(logits(ours, x), logits(reference, x)) > 1e-3
    ours.save_pretrained(tmp_path / "ours")
    assert read_adapter(tmp_path / "ours")[1].keys() == read_adapter(tmp_path)[1].keys()


# ---- AdaLoRA after pruning -----------------------------------------------------------------------
ADALORA_TRAIN = {"init_r": 4, "target_r": 1, "total_step": 6, "tinit": 1, "tfinal": 2, "deltaT": 1}


def _train_adalora(model: Any, update: Any) -> None:
    """A few SGD steps with update_and_allocate; layer 1's triplets start tiny, so they are pruned to 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers.1." in name and ".lora_" in name and "ranknum" not in name:
                p.mul_(1e-3)
    kind = MODEL_KINDS["vit"]
    x, labels = kind.inputs(), torch.tensor([0, 2])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(ADALORA_TRAIN["total_step"]):
        loss = model(pixel_values=x, labels=labels).loss
        loss.backward()
        optimizer.step()
        update(step)
        optimizer.zero_grad()
    model.eval()


def _assert_pruned(pattern: dict[str, list[bool]] | None) -> None:
    assert pattern is not None and len(pattern) == 4
    ranks = {k: sum(v) for k, v in pattern.items()}
    assert sum(ranks.values()) == 4, ranks
    assert any(r == 0 for r in ranks.values()), ranks
    assert all(k.startswith("vit.layers.") and k.endswith(".lora_E") for k in pattern)


def test_trained_adalora_peft_to_deltatune(tmp_path: Path) -> None:
    kind = MODEL_KINDS["vit"]
    x = kind.inputs()
    reference = _peft_model("adalora", "vit", ADALORA_TRAIN)
    _train_adalora(reference, reference.base_model.update_and_allocate)
    reference.save_pretrained(tmp_path)
    config, tensors = read_adapter(tmp_path)
    _assert_pruned(config["rank_pattern"])
    assert any(t.numel() == 0 for t in tensors.values())
    expected = logits(reference, x)
    ours = deltatune.PeftModel.from_pretrained(kind.build(0), tmp_path)
    diff = max_abs_diff(logits(ours, x), expected)
    _record("adalora-pruned peft->deltatune", diff)
    assert diff < TOL
    ours.save_pretrained(tmp_path / "again")
    again_config, again_tensors = read_adapter(tmp_path / "again")
    assert again_config["rank_pattern"] == config["rank_pattern"]
    assert {k: v.shape for k, v in again_tensors.items()} == {k: v.shape for k, v in tensors.items()}


def test_trained_adalora_deltatune_to_peft(tmp_path: Path) -> None:
    kind = MODEL_KINDS["vit"]
    x = kind.inputs()
    ours = _our_model("adalora", "vit", ADALORA_TRAIN)
    _train_adalora(ours, ours.update_and_allocate)
    _assert_pruned(ours.peft_config["default"].rank_pattern)
    expected = logits(ours, x)
    ours.save_pretrained(tmp_path)
    config, tensors = read_adapter(tmp_path)
    _assert_pruned(config["rank_pattern"])
    assert any(t.numel() == 0 for t in tensors.values())
    loaded = peft.PeftModel.from_pretrained(kind.build(0), str(tmp_path)).eval()
    diff = max_abs_diff(logits(loaded, x), expected)
    _record("adalora-pruned deltatune->peft", diff)
    assert diff < TOL
    reloaded = deltatune.PeftModel.from_pretrained(kind.build(0), tmp_path)
    assert max_abs_diff(logits(reloaded, x), expected) == 0.0
