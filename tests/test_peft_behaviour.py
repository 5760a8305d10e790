"""Where deltatune implements a PEFT feature it behaves as peft 0.21.2 does (issue 17, item 6): the same
exception types and warnings, messages that start with PEFT's own sentence (PEFT's tests and its users match
on it; deltatune's explanation follows), checked with peft itself as the oracle where that is practical.

The differences deltatune keeps on purpose (README, "Where deltatune differs on purpose") are tested at the
end, one test per bullet added for this issue.
"""

from __future__ import annotations

import copy
import importlib
import json
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

import deltatune

peft = pytest.importorskip("peft")

LIBS = ["deltatune", "peft"]


def lib(name: str) -> ModuleType:
    """The library under test: deltatune, or peft as the oracle (same public names)."""
    return importlib.import_module(name)


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(x)))


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


class Stack(nn.Module):
    """Numbered blocks under a container that is not the first name component (``body.blocks.N.lin``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Module()
        self.body.blocks = nn.ModuleList(nn.ModuleDict({"lin": nn.Linear(4, 4)}) for _ in range(3))


def targeted(model: Any) -> list[str]:
    """Names of the modules holding a LoRA adapter (works for both libraries' layers)."""
    return sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and n.endswith(("lin", "lin0")))


# ---- configs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LIBS)
def test_unknown_config_keys_warn_once_with_peft_text(name: str, tmp_path: Path) -> None:
    m = lib(name)
    m.LoraConfig(target_modules=["lin0"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "foobar": "baz", "spam": 123}))
    for load in (m.LoraConfig.from_pretrained, m.PeftConfig.from_pretrained):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            config = load(tmp_path)
        assert type(config) is m.LoraConfig
        assert [type(w.message) for w in record] == [UserWarning]
        assert str(record[0].message).startswith(
            "Unexpected keyword arguments ['foobar', 'spam'] for class LoraConfig, these are ignored."
        )


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize("pattern", [[], ""])
def test_empty_layers_pattern_is_no_pattern(name: str, pattern: Any) -> None:
    m = lib(name)
    assert m.LoraConfig(target_modules=["lin"], layers_pattern=pattern).layers_pattern == pattern
    config = m.LoraConfig(target_modules=["lin"], layers_to_transform=[1], layers_pattern=pattern)
    model = m.get_peft_model(Stack(), config)
    assert targeted(model) == ["base_model.model.body.blocks.1.lin"]


@pytest.mark.parametrize("name", LIBS)
def test_peft_type_argument_is_overwritten(name: str, tmp_path: Path) -> None:
    m = lib(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deltatune says it overwrote the value (see the last tests)
        config = m.LoraConfig(peft_type="test", target_modules=["lin0"])
    assert str(getattr(config.peft_type, "value", config.peft_type)) == "LORA"
    config.save_pretrained(tmp_path)
    assert m.LoraConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lora_bias": True, "use_dora": True}, "The argument lora_bias=True is"),
        ({"lora_bias": True, "init_lora_weights": "gaussian"}, "The argument lora_bias=True is"),
        (
            {"target_modules": ".*lin", "layers_to_transform": [0]},
            "`layers_to_transform` cannot be used when `target_modules` is a str.",
        ),
        (
            {"target_modules": ".*lin", "layers_pattern": ["bar"]},
            "`layers_pattern` cannot be used when `target_modules` is a str.",
        ),
        (
            {"target_modules": ["lin"], "layers_pattern": "model.layers"},
            "When `layers_pattern` is specified, `layers_to_transform` must also be specified.",
        ),
    ],
)
def test_lora_config_refusals_as_peft(name: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lib(name).LoraConfig(**kwargs)


@pytest.mark.parametrize("name", LIBS)
def test_adalora_config_messages_as_peft(name: str) -> None:
    m = lib(name)
    with pytest.raises(ValueError, match="ADALORA does not support DoRA"):
        m.AdaLoraConfig(use_dora=True, total_step=1)
    with pytest.raises(ValueError, match="ADALORA does not support LOFTQ"):
        m.AdaLoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}, total_step=1)
    msg = "`orth_reg_weight` should be greater than or equal to 0, but the value passed is -0.5"
    with pytest.raises(ValueError, match=msg):
        m.AdaLoraConfig(total_step=1, orth_reg_weight=-0.5)
    for total_step, tinit, tfinal in [(100, 20, 80), (10, 0, 10)]:
        with pytest.raises(
            ValueError, match="The supplied schedule values don't allow for a budgeting phase"
        ):
            m.AdaLoraConfig(total_step=total_step, tinit=tinit, tfinal=tfinal)
    with pytest.raises(
        ValueError, match="AdaLoRA does not work when `total_step` is None, supply a value > 0"
    ):
        m.AdaLoraConfig(total_step=0)
    with pytest.warns(UserWarning, match="Note that `r` is not used in AdaLora and will be ignored."):
        m.AdaLoraConfig(r=10, total_step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.AdaLoraConfig(init_r=12, lora_alpha=32, total_step=1)  # no warning with the defaults


# ---- get_peft_model ------------------------------------------------------------------------------------
class WithContainer(nn.Module):
    def __init__(self, container: nn.Module) -> None:
        super().__init__()
        self.other_layer = nn.Linear(10, 10)
        self.module = container


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize(
    "container",
    [
        lambda: nn.ModuleDict({"foo": nn.Linear(10, 10)}),
        lambda: nn.ModuleList([nn.Linear(10, 10)]),
        lambda: nn.ParameterDict({"foo": nn.Parameter(torch.rand(10, 10))}),
        lambda: nn.ParameterList([nn.Parameter(torch.rand(10, 10))]),
    ],
)
def test_modules_to_save_refuses_containers(name: str, container: Any) -> None:
    m = lib(name)
    model = WithContainer(container())
    config = m.LoraConfig(target_modules=["other_layer"], modules_to_save=["module"])
    with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type"):
        m.get_peft_model(model, config)
    if name == "deltatune":  # refused before anything changed
        assert isinstance(model.other_layer, nn.Linear)


class Mha(nn.Module):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, **kwargs)


MHA_ATTRIBUTES = [
    "embed_dim",
    "kdim",
    "vdim",
    "_qkv_same_embed_dim",
    "num_heads",
    "dropout",
    "batch_first",
    "head_dim",
    "add_zero_attn",
]


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize("kwargs", [{}, {"bias": False, "batch_first": True, "add_bias_kv": True}])
def test_lora_multihead_attention_exposes_its_attributes(name: str, kwargs: dict[str, Any]) -> None:
    m = lib(name)
    torch.manual_seed(0)
    model = Mha(**kwargs)
    plain = copy.deepcopy(model.mha)
    layer = m.get_peft_model(model, m.LoraConfig(target_modules=["mha"])).base_model.model.mha
    assert layer is not plain and not isinstance(layer, nn.MultiheadAttention)
    for attr in MHA_ATTRIBUTES:
        assert getattr(layer, attr) == getattr(plain, attr), attr
    for attr in ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v"):
        ours, base = getattr(layer, attr), getattr(plain, attr)
        assert (ours is None and base is None) or torch.equal(ours, base), attr
    assert layer.out_proj is layer.base_layer.out_proj.base_layer  # the Linear inside its LoRA layer
    assert isinstance(layer.out_proj, nn.Linear) and torch.equal(layer.out_proj.weight, plain.out_proj.weight)
    attn_mask = torch.randint(0, 2, (5, 5)).bool()
    key_padding_mask = torch.randint(0, 2, (5, 5)).bool()
    query = torch.rand(5, 5, 8)
    mask0, kind0 = plain.merge_masks(attn_mask, key_padding_mask, query)
    mask1, kind1 = layer.merge_masks(attn_mask, key_padding_mask, query)
    assert torch.equal(mask0, mask1) and kind0 == kind1


class Named(nn.Module):
    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.lin0 = nn.Linear(4, 4)
        if name is not None:
            self.name_or_path = name


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize(
    ("model_name", "given", "expected"), [(None, None, None), ("foobar", None, "foobar")]
)
def test_base_model_name_or_path_comes_from_the_model(
    name: str, model_name: str | None, given: str | None, expected: str | None
) -> None:
    m = lib(name)
    config = m.LoraConfig(target_modules=["lin0"], base_model_name_or_path=given)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        m.get_peft_model(Named(model_name), config)
    assert config.base_model_name_or_path == expected
    assert not any("renamed" in str(w.message) for w in record)


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize(("model_name", "shown"), [(None, "None"), ("foobar", "foobar")])
def test_a_given_base_model_name_is_replaced_with_a_warning(
    name: str, model_name: str | None, shown: str
) -> None:
    m = lib(name)
    config = m.LoraConfig(target_modules=["lin0"], base_model_name_or_path="custom_name")
    with pytest.warns(UserWarning, match=f"was renamed from 'custom_name' to '{shown}'"):
        m.get_peft_model(Named(model_name), config)
    assert config.base_model_name_or_path == model_name


def test_base_model_name_of_a_transformers_model(tmp_path: Path) -> None:
    from tiny import tiny_vit

    saved = tiny_vit()
    saved.save_pretrained(tmp_path)
    loaded = type(saved).from_pretrained(tmp_path)
    for m in (deltatune, peft):
        assert (
            m.get_peft_model(tiny_vit(), m.LoraConfig(target_modules=["q_proj"]))
            .peft_config["default"]
            .base_model_name_or_path
            is None
        )  # built from a config: no name
        model = m.get_peft_model(copy.deepcopy(loaded), m.LoraConfig(target_modules=["q_proj"]))
        assert model.peft_config["default"].base_model_name_or_path == str(tmp_path)


@pytest.mark.parametrize("name", LIBS)
def test_revision_overwrite_warns(name: str) -> None:
    m = lib(name)
    config = m.LoraConfig(target_modules=["lin0"], revision="v2.0.0")
    msg = "peft config has already set base model revision to v2.0.0, overwriting with revision main"
    with pytest.warns(UserWarning, match=msg):
        m.get_peft_model(mlp(), config, revision="main")
    assert config.revision == "main"


@pytest.mark.parametrize("name", LIBS)
def test_wrapping_a_model_that_holds_adapter_layers_warns(name: str) -> None:
    m = lib(name)
    base = nn.Sequential(nn.Linear(10, 2), nn.Linear(2, 10))
    model = m.get_peft_model(base, m.LoraConfig(target_modules="0"))
    with pytest.warns(UserWarning, match=r"You are trying to modify a model .*"):
        m.get_peft_model(model, m.LoraConfig(target_modules="base_model.model.1"))
    fresh = nn.Sequential(nn.Linear(10, 2), nn.Linear(2, 10))
    m.get_peft_model(fresh, m.LoraConfig(target_modules="0")).unload()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        m.get_peft_model(fresh, m.LoraConfig(target_modules="0"))  # unloaded: no warning
    assert not any("You are trying to modify a model" in str(w.message) for w in record)


@pytest.mark.parametrize("name", LIBS)
def test_exclude_modules_that_exclude_nothing_warn(name: str) -> None:
    m = lib(name)
    config = m.LoraConfig(target_modules=["lin1"], exclude_modules=["non_existent_module"])
    with pytest.warns(UserWarning, match="You have passed exclude_modules=.* but no modules were excluded"):
        m.get_peft_model(mlp(), config)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        m.get_peft_model(mlp(), m.LoraConfig(target_modules=["lin0", "lin1"], exclude_modules=["lin1"]))
    assert not any("no modules were excluded" in str(w.message) for w in record)


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"target_modules": ["lin0", "lin1", "relu"], "exclude_modules": ["lin0", "lin1", "relu"]},
            "All modules",
        ),
        ({"target_modules": ["non_existent_module"]}, "Target modules .* not found in the base model"),
        (
            {"target_modules": ["lin0", "non_existent_module"], "exclude_modules": ["lin0"]},
            "No modules were targeted for adaptation",
        ),
    ],
)
def test_no_target_messages_as_peft(name: str, kwargs: dict[str, Any], message: str) -> None:
    m = lib(name)
    with pytest.raises(ValueError, match=message):
        m.get_peft_model(mlp(), m.LoraConfig(**kwargs))


@pytest.mark.parametrize("name", LIBS)
def test_invalid_bias_raises_not_implemented_when_applied(name: str) -> None:
    m = lib(name)
    config = m.LoraConfig(target_modules=["lin0"], bias="invalid")  # accepted by the config, as in peft
    with pytest.raises(NotImplementedError):
        m.get_peft_model(mlp(), config)


@pytest.mark.parametrize("name", LIBS)
def test_one_adapter_with_bias_then_others_without(name: str) -> None:
    m = lib(name)
    model = m.get_peft_model(mlp(), m.LoraConfig(target_modules=["lin0"], bias="all"))
    with pytest.raises(ValueError, match=r"supports only 1 adapter with bias\. When using multiple adapters"):
        model.add_adapter("other", m.LoraConfig(target_modules=["lin0"], bias="lora_only"))
    assert len(model.peft_config) == 1
    model.add_adapter("other", m.LoraConfig(target_modules=["lin0"], bias="none"))
    assert set(model.peft_config) == {"default", "other"}


# ---- DoRA at initialisation ----------------------------------------------------------------------------
class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1000, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.mark.parametrize("name", LIBS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dora_is_the_identity_at_init_bit_for_bit(name: str, mode: str) -> None:
    m = lib(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the case the issue measured (1e-7 off before)
    try:
        torch.manual_seed(0)
        model = Wide().eval()
        x = torch.rand(10, 1000)
        base = model(x)
        dora = m.get_peft_model(model, m.LoraConfig(target_modules=["linear"], use_dora=True))
        getattr(dora, mode)()
        assert torch.equal(dora(x), base)
        with dora.disable_adapter():
            assert torch.equal(dora(x), base)
    finally:
        torch.set_num_threads(threads)


# ---- loading -------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(6, 6)


class OldModel(nn.Module):
    """The old layout: ``visual.blocks.N.attn`` and ``model.layers.N.attn``."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.ModuleDict({"blocks": nn.ModuleList([Block() for _ in range(2)])})
        self.model = nn.ModuleDict({"layers": nn.ModuleList([Block() for _ in range(2)])})


class NewModel(nn.Module):
    """The new layout, with transformers' rule mapping old checkpoint keys onto it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.visual = nn.ModuleDict({"blocks": nn.ModuleList([Block() for _ in range(2)])})
        self.model.language_model = nn.ModuleDict({"layers": nn.ModuleList([Block() for _ in range(2)])})
        self._checkpoint_conversion_mapping = {
            "^visual": "model.visual",
            r"^model(?!\.(language_model|visual))": "model.language_model",
        }


@pytest.mark.parametrize("saver", LIBS)
@pytest.mark.parametrize("layouts", [("old", "new"), ("new", "new"), ("old", "old")])
def test_from_pretrained_applies_the_checkpoint_conversion_mapping(
    saver: str, layouts: tuple[str, str], tmp_path: Path
) -> None:
    make = {"old": OldModel, "new": NewModel}
    m = lib(saver)
    model = m.get_peft_model(make[layouts[0]](), m.LoraConfig(target_modules=["attn"]))
    for param_name, param in model.named_parameters():
        if "lora_" in param_name:
            param.data.fill_(1.0 if "lora_A" in param_name else 2.0)
    model.save_pretrained(tmp_path)
    loaded = deltatune.PeftModel.from_pretrained(make[layouts[1]](), tmp_path)  # strict: every key placed
    values = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(values) == 8
    for param_name, param in values.items():
        assert torch.equal(param, torch.full_like(param, 1.0 if "lora_A" in param_name else 2.0)), param_name


def test_key_mapping_argument_overrides_the_models(tmp_path: Path) -> None:
    model = deltatune.get_peft_model(OldModel(), deltatune.LoraConfig(target_modules=["attn"]))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError):  # no mapping: the old keys match nothing in the new layout
        deltatune.PeftModel.from_pretrained(NewModel(), tmp_path, key_mapping={})


# ---- deliberate differences (README, "Where deltatune differs on purpose") -------------------------------
def test_differs_adalora_without_total_step_is_accepted() -> None:
    with pytest.raises(ValueError, match="AdaLoRA does not work when `total_step` is None"):
        peft.AdaLoraConfig(total_step=None)
    config = deltatune.AdaLoraConfig(total_step=None, target_modules=["lin0"])  # the Trainer fills it
    model = deltatune.get_peft_model(mlp(), config)
    with pytest.raises(ValueError, match="AdaLoRA does not work when `total_step` is None"):
        model.base_model.update_and_allocate(1)  # a plain loop that never set it: PEFT's sentence, then ours


def test_differs_a_mismatching_peft_type_argument_warns() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft.LoraConfig(peft_type="LOKR")  # silently overwritten
    with pytest.warns(deltatune.PeftWarning, match="peft_type='LOKR' does not match LoraConfig"):
        assert deltatune.LoraConfig(peft_type="LOKR").peft_type == "LORA"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deltatune.LoraConfig(peft_type="lora")  # the class's own type, any case: no warning


def test_differs_invalid_bias_is_refused_before_the_model_changes() -> None:
    theirs = mlp()
    with pytest.raises(NotImplementedError):
        peft.get_peft_model(theirs, peft.LoraConfig(target_modules=["lin0"], bias="invalid"))
    assert not isinstance(theirs.lin0, nn.Linear)  # peft had already wrapped the layer
    ours = mlp()
    with pytest.raises(ValueError, match="Requested bias: invalid, is not implemented; bias must be one of"):
        deltatune.get_peft_model(ours, deltatune.LoraConfig(target_modules=["lin0"], bias="invalid"))
    assert isinstance(ours.lin0, nn.Linear)


def test_differs_messages_add_deltatune_explanation_after_peft_sentence() -> None:
    with pytest.raises(ValueError) as info:
        deltatune.get_peft_model(mlp(), deltatune.LoraConfig(target_modules=["lin_0"]))
    message = str(info.value)
    assert message.startswith("Target modules {'lin_0'} not found in the base model.")
    assert "closest ['lin0'" in message


def test_differs_loading_a_config_through_another_method_class_is_refused(tmp_path: Path) -> None:
    peft.LoraConfig(target_modules=["lin0"]).save_pretrained(tmp_path)
    assert type(peft.LoHaConfig.from_pretrained(tmp_path)) is peft.LoraConfig  # peft returns another class
    with pytest.raises(ValueError, match="LoHaConfig"):
        deltatune.LoHaConfig.from_pretrained(tmp_path)


class LossModel(nn.Module):
    """An MLP whose forward returns an output with a ``loss``, as transformers models do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(loss=self.lin1(torch.relu(self.lin0(x))).square().mean())


def test_differs_adalora_orthogonal_regulariser_without_task_type() -> None:
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    losses = {}
    for m in (peft, deltatune):
        torch.manual_seed(0)
        model = m.get_peft_model(
            LossModel(), m.AdaLoraConfig(target_modules=["lin0"], total_step=10, orth_reg_weight=0.5)
        )
        model.train()
        plain = model.get_base_model()(x).loss
        losses[m.__name__] = (model(x).loss - plain).item()
    assert losses["peft"] == 0.0  # peft issue 432: PeftModel.forward skips AdaLoraModel.forward
    assert losses["deltatune"] > 0.0  # orth_reg_weight × ‖AᵀA − I‖ + ‖BBᵀ − I‖ terms


@pytest.mark.parametrize("name", LIBS)
def test_grouped_conv_rank_and_ia3_feedforward_messages_as_peft(name: str) -> None:
    m = lib(name)

    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv2d = nn.Conv2d(4, 4, 3, groups=2)

    msg = (
        "Targeting a Conv2d with groups=2 and rank 1. Currently, support is limited to conv layers where the rank is "
        "divisible by groups. Either choose a different rank or do not target this specific layer."
    )
    with pytest.raises(ValueError, match=msg), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that grouped convs cannot merge
        m.get_peft_model(Grouped(), m.LoraConfig(target_modules=["conv2d"], r=1))
    with pytest.raises(ValueError, match=r"^`feedforward_modules` should be a subset of `target_modules`$"):
        m.IA3Config(target_modules=["k"], feedforward_modules=["q"])
