"""``print_trainable_parameters`` on the guide's ViT-base (random weights, no download) prints exactly
the numbers in issue 2 / peft-format.md §8, each on a fresh model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from transformers import ViTConfig, ViTForImageClassification

from deltatune import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, get_peft_model

GUIDE_CASES: list[tuple[str, Callable[[], PeftConfig], str, tuple[int, int]]] = [
    (
        "lora",
        lambda: LoraConfig(
            r=16,
            lora_alpha=16,
            target_modules=["query", "value"],
            lora_dropout=0.1,
            bias="none",
            modules_to_save=["classifier"],
        ),
        "trainable params: 667,493 || all params: 86,543,818 || trainable%: 0.7713",
        (24, 2 * 16 * 768),
    ),
    (
        "loha",
        lambda: LoHaConfig(
            r=16,
            alpha=16,
            target_modules=["query", "value"],
            module_dropout=0.1,
            modules_to_save=["classifier"],
        ),
        "trainable params: 1,257,317 || all params: 87,133,642 || trainable%: 1.4430",
        (24, 4 * 16 * 768),
    ),
    (
        "lokr",
        lambda: LoKrConfig(
            r=16,
            alpha=16,
            target_modules=["query", "value"],
            module_dropout=0.1,
            modules_to_save=["classifier"],
        ),
        "trainable params: 116,069 || all params: 85,992,394 || trainable%: 0.1350",
        (24, 24 * 24 + 32 * 32),
    ),
    (
        "adalora",
        # As in the guide: no total_step (accepted at config time).
        lambda: AdaLoraConfig(
            r=8,
            init_r=12,
            tinit=200,
            tfinal=1000,
            deltaT=10,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
        ),
        "trainable params: 520,325 || all params: 86,396,674 || trainable%: 0.6023",
        (24, 12 * 768 + 768 * 12 + 12),
    ),
]


@pytest.mark.parametrize(
    ("name", "make_config", "expected", "per_module"), GUIDE_CASES, ids=[c[0] for c in GUIDE_CASES]
)
def test_guide_parameter_counts(
    name: str,
    make_config: Callable[[], PeftConfig],
    expected: str,
    per_module: tuple[int, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ViTForImageClassification(ViTConfig(num_labels=101))
    assert sum(p.numel() for p in base.parameters()) == 85_876_325
    model = get_peft_model(base, make_config())
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == expected
    modules, numel = per_module
    layers = list(model.base_model.adapter_layers())
    assert len(layers) == modules
    assert {n.rsplit(".", 1)[-1] for n, _ in layers} == {"q_proj", "v_proj"}
    assert model.base_model.adapter_parameter_count("default") == modules * numel
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == modules * numel + 768 * 101 + 101
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in expected
