"""Hot-swapping LoRA adapters (``deltatune.utils.hotswap``, PEFT's ``peft.utils.hotswap``): a swapped-in adapter
gives what loading it fresh gives (and peft's logits, for peft-saved adapters); after
``prepare_model_for_compiled_hotswap`` a compiled model swaps adapters of another rank and alpha without
recompiling (dynamo's ``CompileCounter`` as the backend counts compilations); PEFT's checks and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import MODEL_KINDS, logits, make_config
from torch._dynamo.testing import CompileCounter

import deltatune
from deltatune import LoraConfig, PeftModel, get_peft_model
from deltatune.utils.hotswap import (
    check_hotswap_configs_compatible,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    prepare_model_for_compiled_hotswap,
)

MLP = MODEL_KINDS["mlp"]


def _save_peft(
    path: Path,
    r: int,
    alpha: float,
    seed: int,
    targets: list[str] | None = None,
    head: bool = True,
    **kw: Any,
) -> Any:
    """A peft LoRA adapter (non-zero; a trained ``modules_to_save`` head unless ``head=False``) saved at
    ``path``; returns the peft model."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets or ["fc1", "fc2"],
        modules_to_save=["head"] if head else None,
        init_lora_weights=False,
        **kw,
    )
    model = peft.get_peft_model(MLP.build(0), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model.eval()


def _load(path: Path, kind: str = "mlp") -> Any:
    return PeftModel.from_pretrained(MODEL_KINDS[kind].build(0), path)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_peft_adapter_swaps_in_to_peft_logits(tmp_path: Path) -> None:
    """Uncompiled, unprepared: another rank and alpha swap in and give peft's logits of the new adapter."""
    _save_peft(tmp_path / "a", r=4, alpha=8, seed=1)
    second = _save_peft(tmp_path / "b", r=2, alpha=5, seed=2)
    model = _load(tmp_path / "a")
    hotswap_adapter(model, tmp_path / "b", adapter_name="default")
    x = MLP.inputs()
    assert _close(logits(model, x), logits(second, x))
    assert _close(logits(model, x), logits(_load(tmp_path / "b"), x))


def test_same_result_as_peft_hotswap(tmp_path: Path) -> None:
    """peft's own hotswap_adapter on peft's model and deltatune's on deltatune's give the same logits (without
    ``modules_to_save``, which peft 0.21's hotswap_adapter fails on with a KeyError; deltatune swaps them too)."""
    _save_peft(tmp_path / "a", r=4, alpha=4, seed=1, head=False)
    _save_peft(tmp_path / "b", r=2, alpha=7, seed=2, head=False)
    theirs = peft.PeftModel.from_pretrained(MLP.build(0), tmp_path / "a")
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter

    peft_hotswap_adapter(theirs, str(tmp_path / "b"), adapter_name="default", torch_device="cpu")
    ours = _load(tmp_path / "a")
    hotswap_adapter(ours, tmp_path / "b", adapter_name="default")
    assert _close(logits(ours, MLP.inputs()), logits(theirs, MLP.inputs()))


def test_compiled_swap_does_not_recompile(tmp_path: Path) -> None:
    """Prepared, compiled: a second adapter (smaller rank, other alpha) and back again, one compilation, each
    giving its own fresh outputs (and peft's)."""
    first = _save_peft(tmp_path / "a", r=4, alpha=8, seed=1)
    second = _save_peft(tmp_path / "b", r=2, alpha=5, seed=2)
    torch._dynamo.reset()
    model = _load(tmp_path / "a")
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = MLP.inputs()
    with torch.no_grad():
        assert _close(compiled(x), logits(first, x))
        hotswap_adapter(compiled, tmp_path / "b", adapter_name="default")
        swapped = compiled(x)
        hotswap_adapter(compiled, tmp_path / "a", adapter_name="default")
        back = compiled(x)
    assert counter.frame_count == 1
    assert _close(swapped, logits(second, x)) and _close(swapped, logits(_load(tmp_path / "b"), x))
    assert _close(back, logits(first, x))


def test_without_prepare_a_new_alpha_recompiles(tmp_path: Path) -> None:
    """The control for the test above: the counter does see a recompilation when the scale is a float."""
    _save_peft(tmp_path / "a", r=2, alpha=8, seed=1)
    _save_peft(tmp_path / "b", r=2, alpha=5, seed=2)
    torch._dynamo.reset()
    model = _load(tmp_path / "a")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = MLP.inputs()
    with torch.no_grad():
        compiled(x)
        hotswap_adapter(compiled, tmp_path / "b", adapter_name="default")
        assert _close(compiled(x), logits(_load(tmp_path / "b"), x))
    assert counter.frame_count == 2


@pytest.mark.parametrize(
    ("kind", "ranks"),
    [
        ("mlp", (4, 2, 8)),
        ("conv", (4, 2, 8)),
        ("grouped", (4, 8, 12)),
        ("gpt2", (4, 2, 8)),
        ("embedding", (4, 2, 8)),
        ("mha", (4, 2, 8)),
    ],
)
def test_every_lora_kind_pads_and_swaps(tmp_path: Path, kind: str, ranks: tuple[int, int, int]) -> None:
    """Padding to target_rank leaves the outputs unchanged; a swapped-in adapter equals a fresh load."""
    spec = MODEL_KINDS[kind]
    first, second, target = ranks
    for name, r, alpha, seed in (("a", first, 8, 1), ("b", second, 3, 2)):
        torch.manual_seed(seed)
        get_peft_model(
            spec.build(0), make_config("lora", spec.targets, None, r=r, lora_alpha=alpha)
        ).save_pretrained(tmp_path / name)
    model = _load(tmp_path / "a", kind)
    x = spec.inputs()
    before = logits(model, x)
    prepare_model_for_compiled_hotswap(model, target_rank=target)
    assert _close(logits(model, x), before)
    hotswap_adapter(model, tmp_path / "b", adapter_name="default")
    assert _close(logits(model, x), logits(_load(tmp_path / "b", kind), x))


def test_new_adapter_on_fewer_modules_zeroes_the_rest(tmp_path: Path) -> None:
    _save_peft(tmp_path / "a", r=2, alpha=4, seed=1)
    narrow = _save_peft(tmp_path / "b", r=2, alpha=4, seed=2, targets=["fc1"])
    model = _load(tmp_path / "a")
    hotswap_adapter(model, tmp_path / "b", adapter_name="default")
    assert _close(logits(model, MLP.inputs()), logits(narrow, MLP.inputs()))
    assert not model.base_model.model.fc2.lora_A["default"].weight.any()


def test_new_adapter_on_other_modules_is_refused(tmp_path: Path) -> None:
    _save_peft(tmp_path / "a", r=2, alpha=4, seed=1, targets=["fc1"])
    _save_peft(tmp_path / "b", r=2, alpha=4, seed=2)
    model = _load(tmp_path / "a")
    with pytest.raises(RuntimeError, match=r"unexpected keys found: .*fc2"):
        hotswap_adapter(model, tmp_path / "b", adapter_name="default")


def test_rank_larger_than_target_is_refused(tmp_path: Path) -> None:
    _save_peft(tmp_path / "a", r=4, alpha=8, seed=1)
    _save_peft(tmp_path / "big", r=8, alpha=8, seed=2)
    model = _load(tmp_path / "a")
    with pytest.raises(ValueError, match="target rank 2, but the original rank is larger"):
        prepare_model_for_compiled_hotswap(model, target_rank=2)
    assert isinstance(model.base_model.model.fc1.scaling["default"], float), (
        "a refused prepare changed the model"
    )
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    with pytest.raises(ValueError, match=r"larger rank .* target_rank"):
        hotswap_adapter(model, tmp_path / "big", adapter_name="default")
    unprepared = _load(tmp_path / "a")  # uncompiled and unprepared, a larger rank takes its new shape
    hotswap_adapter(unprepared, tmp_path / "big", adapter_name="default")
    assert _close(logits(unprepared, MLP.inputs()), logits(_load(tmp_path / "big"), MLP.inputs()))


def test_incompatible_configs_are_refused_as_in_peft(tmp_path: Path) -> None:
    _save_peft(tmp_path / "a", r=2, alpha=4, seed=1)
    _save_peft(tmp_path / "rs", r=2, alpha=4, seed=2, use_rslora=True)
    model = _load(tmp_path / "a")
    with pytest.raises(ValueError, match="Configs are incompatible: for use_rslora, False != True"):
        hotswap_adapter(model, tmp_path / "rs", adapter_name="default")
    loha = deltatune.LoHaConfig(target_modules=["fc1"])
    with pytest.raises(ValueError, match="Incompatible PEFT types found: LORA and LOHA"):
        check_hotswap_configs_compatible(LoraConfig(target_modules=["fc1"]), loha)
    with pytest.raises(ValueError, match="Hotswapping only supports LORA but LOHA was passed"):
        check_hotswap_configs_compatible(loha, loha)
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        hotswap_adapter(model, tmp_path / "a", adapter_name="other")


def test_merged_adapter_is_refused(tmp_path: Path) -> None:
    _save_peft(tmp_path / "a", r=2, alpha=4, seed=1)
    model = _load(tmp_path / "a")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weights"):
        hotswap_adapter(model, tmp_path / "a", adapter_name="default")


def test_prepare_checks(tmp_path: Path) -> None:
    _save_peft(tmp_path / "a", r=2, alpha=4, seed=1)
    model = _load(tmp_path / "a")
    compiled = torch.compile(model, backend=CompileCounter())
    with pytest.raises(ValueError, match="before\\* compiling"):
        prepare_model_for_compiled_hotswap(compiled)
    with pytest.warns(UserWarning, match="already compiled"):
        prepare_model_for_compiled_hotswap(compiled, check_compiled="warn")
    with pytest.raises(ValueError, match="check_compiles should be one of"):
        prepare_model_for_compiled_hotswap(model, check_compiled="loud")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="No adapter layers found"):
        prepare_model_for_compiled_hotswap(MLP.build(0))
    dora = get_peft_model(MLP.build(0), LoraConfig(target_modules=["fc1"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        prepare_model_for_compiled_hotswap(dora)
    config = LoraConfig(r=2, target_modules=["fc1"], rank_pattern={"fc1": 2})
    fresh = _load(tmp_path / "a")
    prepare_model_for_compiled_hotswap(fresh, target_rank=6, config=config)
    assert config.r == 6 and config.rank_pattern == {"fc1": 6}


def test_from_state_dict_with_model_keys(tmp_path: Path) -> None:
    """The low-level function takes the model's own keys, as in PEFT."""
    _save_peft(tmp_path / "a", r=2, alpha=4, seed=1)
    _save_peft(tmp_path / "b", r=2, alpha=4, seed=2)
    model, donor = _load(tmp_path / "a"), _load(tmp_path / "b")
    state = {k: v for k, v in donor.state_dict().items() if "lora_" in k}
    hotswap_adapter_from_state_dict(model, state, "default", donor.peft_config["default"])
    assert _close(logits(model, MLP.inputs()), logits(donor, MLP.inputs()))


@pytest.mark.slow
def test_inductor_swap_gives_the_new_outputs(tmp_path: Path) -> None:
    """With inductor (the default backend) the tensor scale and padded tensors are read at run time, not baked in."""
    _save_peft(tmp_path / "a", r=4, alpha=8, seed=1)
    second = _save_peft(tmp_path / "b", r=2, alpha=5, seed=2)
    torch._dynamo.reset()
    model = _load(tmp_path / "a")
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    compiled = torch.compile(model)
    x = MLP.inputs()
    with torch.no_grad():
        compiled(x)
        hotswap_adapter(compiled, tmp_path / "b", adapter_name="default")
        assert _close(compiled(x), logits(second, x))
